"""Hosted generation: what answers the generate protocol (and the OpenAI door) on a node with a model.

`node.host_backend` (kvswap/config.py) picks the backend, once, when the daemon starts:
- `engine` (node/hosting/engine.py): kvswap's transformers engine, one generation at a time;
- `vllm` (node/hosting/vllm.py): a vLLM OpenAI server the daemon starts and supervises in the vLLM venv,
  with the kvswap connector on the node's home: continuous batching, `hosting.vllm_max_num_seqs` at once.
Both take a `HostedJob` and give a `HostedResult` (node/hosting/backend.py); the daemon keeps the quotas
(the generate protocol's slots are the backend's capacity, one per peer), the metrics and the protocol.
"""

from __future__ import annotations

from .backend import Backend, HostedJob, HostedResult, check_hostable
from .engine import EngineBackend

__all__ = ["Backend", "EngineBackend", "HostedJob", "HostedResult", "check_hostable"]
