"""The operations layer: publish, get, generate, load a cache, audit, verify and report, over a `Home`.

The CLI's commands, the daemon's control-API routes and Python users all call these, so each rule lives once:
- where work runs (`node_for`, ops/source.py): through the daemon running in the home when there is one,
  else in this process;
- what is logged (ops/ledgerlog.py): every prefill, load, generation and audit, whichever way it ran;
- what a source is (`Source.of`): an artifact CID, a document (a path or `Document(text)`), or a document
  hash, as one key (protocol/keys.py); a given document is always bound to the artifact (ops/checks.py).

Each operation has two halves: `<op>(source, home=..., ...)` is what Python users and the CLI call (it picks
the daemon or this process), `<op>_here(home, engine, ...)` does the work in this process with an engine
(what the daemon's routes call, with its resident model). Python users reach the first kind through
`kvswap` (`kvswap.publish`, `kvswap.load_cache`, ...): README "Python".
"""

from .auditing import audit, audit_here
from .checks import check_complete, check_document, check_trust, verify_artifact
from .costs import report
from .fetching import get
from .generation import generate, generate_here
from .ledgerlog import log_audit, log_generation, log_load, log_prefill
from .loading import load_artifact, load_cache, load_kvtensors
from .publishing import publish, publish_here
from .source import Source, engine_for, node_for, resolve

__all__ = ["Source", "audit", "audit_here", "check_complete", "check_document", "check_trust", "engine_for",
           "generate", "generate_here", "get", "load_artifact", "load_cache", "load_kvtensors", "log_audit", "log_generation",
           "log_load", "log_prefill", "node_for", "publish", "publish_here", "report", "resolve",
           "verify_artifact"]
