"""The control API's limits (kvswap/control/): what the daemon accepts from a local client, and how long a
client waits. README.md ("Limits") lists the same values; tests/test_limits_doc.py checks that they agree."""

from __future__ import annotations

MiB = 1024 * 1024

#: Largest control-API request body (bytes): a document to publish. A body is read in pieces up to this
#: bound; a longer or stalled one is refused without being held whole.
MAX_API_BODY_BYTES = 64 * MiB
#: Seconds a client may leave a request body unfinished between two pieces before it is refused (a client
#: that stalls mid-body holds no handler and no more memory than it sent).
API_BODY_IDLE_TIMEOUT_S = 10.0
#: Deepest JSON nesting a control-API body may have (every body kvswap sends is 2 levels deep).
MAX_API_JSON_DEPTH = 32
#: Seconds the CLI waits for one control-API answer (long operations are jobs it polls instead).
API_TIMEOUT_S = 30.0
#: Seconds between two polls of a daemon job (fetch, publish) by the CLI or a Python caller.
JOB_POLL_INTERVAL_S = 0.2
