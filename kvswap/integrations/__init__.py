"""Adapters that plug kvswap artifacts into other serving engines (vLLM: `kvswap.integrations.vllm`).

Nothing here is imported by `import kvswap`: each integration imports its engine (torch, vllm) itself, so
the core package and the CLI stay torch-free.
"""
