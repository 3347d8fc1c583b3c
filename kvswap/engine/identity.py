"""The compute identity: what decides the exact bits of a block-aligned prefill on this machine.

A publisher records it in the artifact's manifest (FORMAT.md, `compute`); an auditor compares it with its own
(kvswap/artifact/audit.py `choose_mode`). Equal identities mean the auditor's recomputation of a block is the
same computation as the publisher's, so an honest artifact is reproduced bit for bit and the audit can demand
exact bits: a poisoning far below any tolerance is then caught. Different identities mean different kernels
(another instruction set, library, device or attention implementation), whose honest results differ in the
last bits, so the audit judges within the dtype's tolerance.

What enters it was measured (docs/exactness.md, "What changes the bits"; torch 2.13.0+cpu on an AMD EPYC with
AVX-512, tiny-qwen3 and SmolLM2-135M, bf16/fp16/fp32, 660 and 1500 tokens): the instruction set torch's own
kernels dispatch to (`ATEN_CPU_CAPABILITY`) changed fp16 and fp32 bits; the ISA oneDNN may use
(`ONEDNN_MAX_CPU_ISA`, and the CPU's bf16 / AMX features) changed bf16 bits; the attention implementation and
the prefill step changed bits in every dtype (kvswap prefills in steps of the artifact's block; a publisher
that prefilled in one forward says `prefill_step` 0, and its artifact is audited within tolerance); repeated
runs never did. The torch build fixes the oneDNN
and MKL versions; the CPU vendor is recorded because MKL takes vendor-specific paths. Torch's thread count did
not change bits at 1, 2 and 4 threads; it is recorded all the same, and an auditor reproduces it (an audit
runs with the publisher's thread count, `Engine.threads`), so it never forces a tolerance audit. The dtype is
in the manifest already.
"""

from __future__ import annotations

import os
import platform

import torch

#: environment variables that limit the instruction sets torch, oneDNN and MKL use (each changes kernels)
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
#: CPU features that pick oneDNN's bf16 / fp16 kernels (torch.cpu._is_<name>_supported)
_KERNEL_FEATURES = ("avx512_bf16", "vnni", "amx_tile", "amx_fp16")


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:  # not Linux: the platform's own name for the processor
        pass
    return platform.processor() or platform.machine()


def _cpu_features() -> str:
    have = []
    for name in _KERNEL_FEATURES:
        probe = getattr(torch.cpu, f"_is_{name}_supported", None)
        if probe is not None and probe():
            have.append(name)
    return "+".join(have) or "none"


def compute_identity(model, device: str, prefill_step: int | None = None) -> dict[str, str]:
    """The identity of prefills by `model` on `device` in this process, in steps of `prefill_step` tokens (0:
    one forward; None: leave it out) (strings only: the manifest's form)."""
    dev = torch.device(device)
    ident = {
        "device": dev.type,
        "torch": f"{torch.__version__} {(torch.version.git_version or '')[:10]}".strip(),
        "attn": str(getattr(model.config, "_attn_implementation", None) or "default"),
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        ident["gpu"] = f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"[:128]
        ident["cuda"] = str(torch.version.cuda)
        ident["tf32"] = str(bool(torch.backends.cuda.matmul.allow_tf32)).lower()
    else:
        ident["isa"] = torch.backends.cpu.get_cpu_capability()
        ident["cpu"] = f"{_cpu_vendor()} {_cpu_features()}"[:128]
        ident["isa_limits"] = ",".join(f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k))[:128] or "none"
        ident["threads"] = str(torch.get_num_threads())
    if prefill_step is not None:
        ident["prefill_step"] = str(int(prefill_step))
    return ident


__all__ = ["ISA_LIMITS", "compute_identity"]
