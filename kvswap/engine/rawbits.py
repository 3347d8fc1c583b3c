"""torch tensors <-> numpy arrays of raw element bits, exact in both directions.

numpy has no bfloat16, and a float round trip through float32 would hide (or invent) bit differences, so
KV crosses the engine boundary as integer views of the same bytes: bf16/fp16 as little-endian uint16,
fp32 as little-endian uint32 (see kvswap/kvtensors.py). Viewing never converts, so every bit survives.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch

from ..protocol.errors import UsageError

#: kvswap dtype name -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: torch dtype -> same-width signed integer dtype (torch views support these everywhere)
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_NP_INT = {2: np.dtype("<i2"), 4: np.dtype("<i4")}
_NP_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r} (expected one of {', '.join(TORCH_DTYPES)})") from None


def tensor_to_bits(tensor: torch.Tensor) -> np.ndarray:
    """A float tensor's bytes as a little-endian unsigned-int numpy array of the same shape (a copy)."""
    ints = tensor.detach().to("cpu").contiguous().view(_INT_VIEW[tensor.dtype])
    arr = ints.numpy().view(_NP_UINT[tensor.element_size()].newbyteorder("="))
    if sys.byteorder != "little":  # pragma: no cover - no big-endian machines here
        arr = arr.byteswap()
    return np.ascontiguousarray(arr.view(_NP_UINT[tensor.element_size()])).copy()


def bits_to_tensor(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `tensor_to_bits`: reinterpret the raw bits as `dtype` (no value conversion).

    The result may share memory with `bits`; callers that keep it must not write to it (DynamicCache copies
    on its first update, which is how the engine uses it).
    """
    width = torch.empty((), dtype=dtype).element_size()
    if bits.dtype.itemsize != width:
        raise UsageError(f"raw bits of width {bits.dtype.itemsize} cannot hold {dtype}")
    arr = np.ascontiguousarray(bits)
    if sys.byteorder != "little":  # pragma: no cover
        arr = arr.byteswap()
    arr = arr.view(_NP_INT[width].newbyteorder("="))
    with warnings.catch_warnings():
        # read-only arrays (np.frombuffer over file bytes) are fine: torch never writes through this view
        warnings.simplefilter("ignore", UserWarning)
        ints = torch.from_numpy(arr)
    return ints.view(dtype)
