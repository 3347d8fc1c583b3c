"""kvswap artifacts in vLLM: a v1 KV connector that loads verified KV into vLLM's paged cache and publishes
what vLLM prefills (connector.py), plus helpers to configure it and to build document requests.

    from vllm import LLM, SamplingParams
    from kvswap.integrations.vllm import kv_transfer_config, document_request

    llm = LLM(model=folder, dtype="bfloat16", kv_transfer_config=kv_transfer_config(home="~/.kvswap-b"))
    prompt, params = document_request(llm.get_tokenizer(), document, "Question: ...")
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64, extra_args=params))

Importing this package imports neither torch nor vllm; `kv_transfer_config` imports vllm when called, and
vLLM imports `kvswap.integrations.vllm.connector` (torch, vllm) itself.
"""

from __future__ import annotations

from ._source import document_hash

__all__ = ["CONNECTOR_CLASS", "CONNECTOR_MODULE", "document_request", "kv_transfer_config", "kvswap_params"]

#: what vLLM's kv_transfer_config names: kv_connector=CONNECTOR_CLASS, kv_connector_module_path=CONNECTOR_MODULE
CONNECTOR_CLASS = "KvswapConnector"
CONNECTOR_MODULE = "kvswap.integrations.vllm.connector"


def kv_transfer_config(home: str | None = None, **options):
    """A vllm KVTransferConfig selecting the kvswap connector on `home` (options: connector.ConnectorOptions).

    kv_load_failure_policy="recompute": a load that fails verification makes vLLM prefill those tokens."""
    from vllm.config import KVTransferConfig

    extra = dict(options)
    if home is not None:
        extra["home"] = str(home)
    return KVTransferConfig(kv_connector=CONNECTOR_CLASS, kv_connector_module_path=CONNECTOR_MODULE,
                            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=extra)


def kvswap_params(**options) -> dict:
    """SamplingParams extra_args carrying kvswap's per-request options (load, cid, document_hash, publish,
    document_tokens): `SamplingParams(..., extra_args=kvswap_params(publish=True))`."""
    return {"kv_transfer_params": {"kvswap": options}}


def document_request(tokenizer, document: str, question: str = "", *, publish: bool = False,
                     cid: str | None = None) -> tuple[dict, dict]:
    """(prompt, extra_args) for a question about a document, tokenized as kvswap's engine does.

    The document and the question are tokenized separately without special tokens and their ids joined
    (kvswap never re-tokenizes joined text), so the prompt starts with exactly the ids an artifact of
    this document holds. The request names the document (its hash, and `cid` if given), so a miss can be
    fetched by the node; with publish=True the document's KV is published after vLLM prefills it."""
    doc_ids = list(tokenizer.encode(document, add_special_tokens=False))
    q_ids = list(tokenizer.encode(question, add_special_tokens=False)) if question else []
    opts: dict = {"document_hash": document_hash(document), "document_tokens": len(doc_ids)}
    if publish:
        opts["publish"] = True
    if cid:
        opts["cid"] = cid
    return {"prompt_token_ids": doc_ids + q_ids}, kvswap_params(**opts)
