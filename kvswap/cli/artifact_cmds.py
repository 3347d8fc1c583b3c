"""Artifact commands over the local store: publish, ls, inspect, verify, generate, export, import, pin,
unpin, rm, gc, fsck, trust, id. The work happens in kvswap/ops/ and kvswap/store.py; this module
parses flags and renders results. The engine (torch) is imported only by publish and generate.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from ..protocol.cid import Cid
from ..protocol.errors import FormatError, IntegrityError, UsageError
from ..artifact.limits import DEFAULT_BLOCK_TOKENS
from . import add_common, emit, home_of


def _home(args):
    """The home every command opens (kvswap/home.py): its settings (store.keep_raw among them), key and store."""
    from ..home import Home

    return Home(home_of(args))


def _read_doc(path: Path):
    from ..document import Document

    return Document.read(path)


def resolve_cid(store, text: str) -> Cid:
    """A full CID, or an unambiguous prefix of one in the local store."""
    try:
        return Cid.parse(text)
    except FormatError:
        matches = [a["cid"] for a in store.list_artifacts() if a["cid"].startswith(text)] if len(text) >= 6 else []
        if len(matches) == 1:
            return Cid.parse(matches[0])
        if len(matches) > 1:
            raise UsageError(f"{text!r} matches {len(matches)} artifacts; give more of the CID") from None
        raise


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# --- publish / generate (engine) ---------------------------------------------------------------------
def cmd_publish(args) -> int:
    from .. import ops
    from .progress import bar

    doc = _read_doc(args.file)
    with bar("prefill", enabled=not args.json) as progress:
        result = ops.publish(doc, home=home_of(args), model=args.model, dtype=args.dtype, codec=args.codec,
                             block_tokens=args.block_tokens, progress=progress)
    emit(args, result, _render_publish)
    return 0


def _render_publish(r: dict) -> str:
    codecs = ", ".join(f"{k} x{v}" for k, v in sorted(r["codecs"].items()))
    return "\n".join([
        r["cid"],
        f"  document  {r['document_hash']}",
        f"  model     {r['model_id']} ({r['model_fingerprint'][:16]}) {r['dtype']}",
        f"  tokens    {r['n_tokens']} in {r['chunks']} chunks ({codecs})",
        f"  size      KV {_size(r['raw_size'])} raw -> {_size(r['kv_stored_size'])} stored (ratio {r['ratio']:.3f}x)"
        f" + last-position logits {_size(r['tail_stored_size'])}",
    ])


def cmd_generate(args) -> int:
    from .. import ops

    if args.doc is not None:
        source = _read_doc(args.doc)
    elif args.cid is not None:
        source = args.cid
        if not args.host:  # a CID prefix names a local artifact
            with _home(args) as home:
                store = home.store
                source = resolve_cid(store, args.cid)
    else:
        raise UsageError("give an artifact CID or --doc FILE")
    result = ops.generate(source, args.prompt, home=home_of(args), model=args.model, dtype=args.dtype,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=args.temperature,
                          host=args.host, decode=args.decode, accept_any=args.accept_any,
                          max_price_token=args.max_price_token, budget=args.budget)
    emit(args, result, lambda r: r["text"])
    return 0


# --- audit ---------------------------------------------------------------------------------------------
def cmd_audit(args) -> int:
    from .. import ops
    from ..modes import AuditMode

    if args.full and (args.fraction is not None or args.blocks is not None):
        raise UsageError("--full audits every block: leave out --fraction and --blocks")
    if args.exact and args.tolerance:
        raise UsageError("give --exact or --tolerance, not both")
    mode = AuditMode.EXACT if args.exact else AuditMode.TOLERANCE if args.tolerance else AuditMode.AUTO
    document = _read_doc(args.doc) if args.doc is not None else None  # bad input fails before any work
    with _home(args) as home:
        cid = resolve_cid(home.store, args.cid)
    source = ops.Source(cid, document)
    result = ops.audit(source, home=home_of(args), model=args.model, fraction=args.fraction, blocks=args.blocks,
                       full=args.full, seed=args.seed, mode=mode, sign=not args.no_sign)
    emit(args, result, _render_audit)
    return 0


def _render_audit(r: dict) -> str:
    n = len(r["blocks"])
    how = ("bit-exact in every block" if r["exact"] else
           f"within tolerance (max relative difference {r['max_rel']:.3g})")
    lines = [f"passed: {r['cid']}",
             f"  audited   {n} of {r['n_blocks']} blocks ({r['drawn']} drawn at random"
             f"{', plus the last' if n > r['drawn'] else ''}): {how}",
             f"  mode      {r['mode']}: {r['why']}",
             f"  time      load {r['load_s']:.3f} s + recompute {r['seconds']:.3f} s on {r['device']}"]
    bound = ", ".join(f"{k} {v:.1%}" for k, v in r["bounds"].items())
    lines.append(f"  detection a publisher who poisoned {bound} would have been caught with at least that probability")
    if r.get("attestation"):
        lines.append(f"  attested  signed by {r['attestation']['auditor'][:16]}... (kvswap inspect lists it)")
    return "\n".join(lines)


# --- inspection ----------------------------------------------------------------------------------------
def cmd_ls(args) -> int:
    with _home(args) as home:
        store = home.store
        rows = store.list_artifacts()
    emit(args, {"artifacts": rows}, _render_ls)
    return 0


def _render_ls(r: dict) -> str:
    rows = r["artifacts"]
    if not rows:
        return "no artifacts in the local store"
    lines = [f"{'CID':<59}  {'MODEL':<16} {'DTYPE':<5} {'TOKENS':>7} {'STORED':>10}  STATE"]
    for a in rows:
        state = ("complete" if a["complete"] else "incomplete") + (", pinned" if a["pinned"] else "")
        lines.append(f"{a['cid']:<59}  {a['model_id'][-16:]:<16} {a['dtype']:<5} {a['n_tokens']:>7} "
                     f"{_size(a['stored_size']):>10}  {state}")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    with _home(args) as home:
        store = home.store
        cid = resolve_cid(store, args.cid)
        manifest = store.get_manifest(cid)
        info = manifest.summary()
        info["signatures"] = [e.summary() for e in store.get_envelopes(cid)]
        info["attestations"] = [a.summary() for a in store.get_attestations(cid)]
        info["missing_blobs"] = [str(c) for c in store.missing_chunks(cid)]
        row = next(a for a in store.list_artifacts() if a["cid"] == str(cid))
        info.update({"complete": row["complete"], "pinned": row["pinned"], "last_used": row["last_used"]})
    emit(args, info, _render_inspect)
    return 0


def _render_inspect(i: dict) -> str:
    lay = i["layout"]
    lines = [
        i["cid"],
        f"  model       {i['model_id']}",
        f"  fingerprint {i['model_fingerprint']}",
        f"  tokenizer   {i['tokenizer_fingerprint']}",
        f"  layout      {lay['layers']} layers x {lay['kv_heads']} kv heads x {lay['head_dim']} dims, {i['dtype']}, "
        f"{lay['block_tokens']} tokens/block",
        f"  tokens      {i['n_tokens']} (token hash {i['token_hash'][:16]}...)",
        f"  document    {i['document_hash']}",
        f"  size        {_size(i['raw_size'])} raw, {_size(i['stored_size'])} stored, {len(i['chunks'])} chunks"
        + (", + tail" if i["tail"] else ""),
        f"  state       {'complete' if i['complete'] else 'incomplete (%d missing)' % len(i['missing_blobs'])}"
        + (", pinned" if i["pinned"] else ""),
    ]
    for s in i["signatures"]:
        lines.append(f"  signed by   {s['signer']} at {_when(s['time'])} UTC")
    for a in i.get("attestations", []):
        lines.append(f"  audited by  {a['auditor']} at {_when(a['time'])} UTC: {a['blocks']} of {a['n_blocks']} blocks, "
                     f"{a['mode']}" + (f" (max relative difference {a['max_rel']:.3g})" if a["mode"] != "exact" else ""))
    for c in i["chunks"]:
        lines.append(f"    [{c['t0']:>6},{c['t1']:>6})  {c['codec']:<6} {c['stored_size']:>10} / {c['raw_size']:<10} "
                     f"{c['cid']}")
    return "\n".join(lines)


def cmd_verify(args) -> int:
    from ..ops import verify_artifact

    with _home(args) as home:
        store = home.store
        result = verify_artifact(store, resolve_cid(store, args.cid), home.policy(args.accept_any))
    emit(args, result, lambda r: f"ok: {r['cid']} ({r['blobs_verified']} blobs, {r['signatures']} signatures)")
    return 0


# --- moving artifacts ------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    with _home(args) as home:
        store = home.store
        result = store.export_artifact(resolve_cid(store, args.cid), args.out)
    emit(args, result, lambda r: f"wrote {r['file']} ({_size(r['bytes'])}, {r['blobs']} blobs)")
    return 0


def cmd_import(args) -> int:
    with _home(args) as home:
        store = home.store
        if not Path(args.file).is_file():
            raise UsageError(f"no such file: {args.file}")
        manifest = store.import_artifact(Path(args.file), home.policy(args.accept_any))
    result = {"cid": str(manifest.cid), "n_tokens": manifest.n_tokens, "stored_size": manifest.stored_size}
    emit(args, result, lambda r: f"imported {r['cid']} ({r['n_tokens']} tokens)")
    return 0


def cmd_pin(args) -> int:
    with _home(args) as home:
        store = home.store
        cid = resolve_cid(store, args.cid)
        store.pin(cid, args.command == "pin")
    emit(args, {"cid": str(cid), "pinned": args.command == "pin"}, lambda r: f"{args.command}ned {r['cid']}")
    return 0


def cmd_rm(args) -> int:
    with _home(args) as home:
        store = home.store
        cid = resolve_cid(store, args.cid)
        freed = store.remove(cid, force=args.force)
    emit(args, {"cid": str(cid), "freed": freed}, lambda r: f"removed {r['cid']} (freed {_size(r['freed'])})")
    return 0


def cmd_gc(args) -> int:
    from ..config import parse_size, store_budget

    budget = parse_size(args.budget) if args.budget is not None else store_budget(home_of(args))
    with _home(args) as home:
        store = home.store
        result = store.gc(budget)
    emit(args, result, lambda r: f"evicted {len(r['evicted'])} artifacts, freed {_size(r['freed'])}; "
                                 f"store {_size(r['after'])} of {_size(r['budget'])} budget")
    return 0


def cmd_fsck(args) -> int:
    with _home(args) as home:
        store = home.store
        result = store.fsck(repair=args.repair)
    emit(args, result, _render_fsck)
    if not result["ok"]:
        raise IntegrityError(f"store is inconsistent: {len(result['problems'])} problems (run `kvswap fsck --repair`)")
    return 0


def _render_fsck(r: dict) -> str:
    lines = [f"{'ok' if r['ok'] else 'PROBLEMS'}: {r['artifacts']} artifacts, {r['chunk_files']} chunk files checked"]
    lines += [f"  problem: {p}" for p in r["problems"]]
    lines += [f"  garbage: {g}" for g in r["garbage"]]
    lines += [f"  repaired: {x}" for x in r["repaired"]]
    return "\n".join(lines)


# --- identity and trust ----------------------------------------------------------------------------------
def cmd_id(args) -> int:
    with _home(args) as home:
        key = home.key
    emit(args, {"public_key": key.public_hex, "home": str(home_of(args))}, lambda r: r["public_key"])
    return 0


def cmd_trust(args) -> int:
    from ..config import read_trust, trust_add, trust_rm, write_trust

    home = home_of(args)
    role = "auditors" if args.auditor else "trusted"
    if args.action in ("add", "rm"):
        if not args.key:
            raise UsageError(f"trust {args.action} needs a KEY: 64 hex digits (`kvswap id`) or a peer id (12D3KooW...)")
        (trust_add if args.action == "add" else trust_rm)(home, args.key, role)
    elif args.action == "policy":
        trust = read_trust(home)
        for name in ("accept_audited", "require_audits"):
            value = getattr(args, name)
            if value is not None:
                if value < 0:
                    raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
                trust[name] = value
        if args.exact_audits is not None:
            trust["exact_audits"] = args.exact_audits
        write_trust(home, trust)
    elif args.key or args.auditor:
        raise UsageError("trust ls takes no KEY")
    trust = read_trust(home)
    with _home(args) as h:
        emit(args, {"self": h.key.public_hex, **trust}, _render_trust)
    return 0


def _render_trust(r: dict) -> str:
    lines = [f"{r['self']}  (this node: always a trusted publisher and auditor)"]
    lines += [f"{k}  publisher" for k in r["trusted"]] + [f"{k}  auditor" for k in r["auditors"]]
    lines.append(f"policy: accept_audited {r['accept_audited']}, require_audits {r['require_audits']}, "
                 f"exact_audits {str(r['exact_audits']).lower()} (FORMAT.md \"Trust policy\")")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    from ..artifact.codecs import CODEC_CHOICES

    p = sub.add_parser("publish", help="prefill a document, then chunk, compress, sign and store its KV")
    p.add_argument("file", type=Path)
    p.add_argument("--model", default=None, help="model name, hub id or folder (default: the engine's)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default: config node.dtype (bf16)")
    p.add_argument("--codec", default="auto", choices=CODEC_CHOICES)
    p.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS, help="tokens per chunk")
    add_common(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("generate", help="generate from a stored artifact without re-running prefill")
    p.add_argument("cid", nargs="?", default=None)
    p.add_argument("--doc", type=Path, default=None, help="find the artifact by this document's hash")
    p.add_argument("--prompt", required=True, help="text appended (as token ids) after the document")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=None, help="sample with this seed (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, with --seed (default 1.0)")
    p.add_argument("--model", default=None, help="engine to load (default: the manifest's model id)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"))
    p.add_argument("--accept-any", action="store_true", help="accept a valid signature by any key")
    p.add_argument("--decode", default="eager", choices=("eager", "static", "compiled"),
                   help="decode step when no node runs here (a node uses its own, compiled once at its start)")
    p.add_argument("--host", default=None, metavar="PEER",
                   help="ask this peer (id or multiaddr) to generate from its resident KV (hosted mode)")
    p.add_argument("--max-price-token", type=int, default=None, metavar="UNITS",
                   help="hosted: the most paid per token (default: config pay.max_price_token)")
    p.add_argument("--budget", type=int, default=None, metavar="UNITS",
                   help="hosted: the most this generation spends (default: config pay.budget; 0 pays nobody)")
    add_common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("audit", help="recompute sampled blocks: does the artifact's KV follow from its tokens?",
                       description="Recompute sampled blocks of a stored artifact over its own KV of the blocks "
                                   "before them and compare with the stored ones (SECURITY.md). Exit 0 when every "
                                   "audited block passes, else one line naming the first failing block.")
    p.add_argument("cid")
    p.add_argument("--fraction", type=float, default=None, help="fraction of blocks to draw (default 0.05)")
    p.add_argument("--blocks", type=int, default=None, help="number of blocks to draw")
    p.add_argument("--full", action="store_true", help="audit every block")
    p.add_argument("--seed", type=int, default=None, help="make the draw repeatable")
    p.add_argument("--exact", action="store_true",
                   help="require bit-exact blocks even when the artifact declares another computation")
    p.add_argument("--tolerance", action="store_true",
                   help="judge within the dtype's tolerance even when this machine's computation is the artifact's "
                        "(default: exact when the compute identities match, tolerance otherwise)")
    p.add_argument("--doc", type=Path, default=None, help="also check the artifact is about this document")
    p.add_argument("--no-sign", action="store_true", help="do not sign an attestation when the audit passes")
    p.add_argument("--model", default=None, help="engine to audit with when no node runs (default: the manifest's)")
    add_common(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("ls", help="list artifacts in the local store")
    add_common(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="show an artifact's manifest, chunks and signatures")
    p.add_argument("cid")
    add_common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="re-check every digest and signature, and the trust policy")
    p.add_argument("cid")
    p.add_argument("--accept-any", action="store_true", help="accept a valid signature by any key")
    add_common(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write one artifact (manifest, signatures, chunks) to a single file")
    p.add_argument("cid")
    p.add_argument("out", type=Path)
    add_common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="verify and add an exported artifact file to the store")
    p.add_argument("file", type=Path)
    p.add_argument("--accept-any", action="store_true", help="accept a valid signature by any key")
    add_common(p)
    p.set_defaults(func=cmd_import)

    for name, text in (("pin", "keep an artifact through gc"), ("unpin", "let gc evict an artifact again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("cid")
        add_common(p)
        p.set_defaults(func=cmd_pin)

    p = sub.add_parser("rm", help="remove an artifact and the chunks no other artifact uses")
    p.add_argument("cid")
    p.add_argument("--force", action="store_true", help="remove even if pinned")
    add_common(p)
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("gc", help="evict least recently used, unpinned artifacts down to a size budget")
    p.add_argument("--budget", default=None, help="e.g. 500M, 20GiB (default: config.toml store.budget, 20GiB)")
    add_common(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("fsck", help="check the store: chunk hashes, index, refcounts, leftovers")
    p.add_argument("--repair", action="store_true", help="remove bad entries and leftovers, fix counts")
    add_common(p)
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser("trust", help="publishers and auditors whose artifacts and audits this node accepts",
                       description="add/rm a publisher key (or, with --auditor, an auditor key), ls the lists, or "
                                   "set the audit policy: accept artifacts from untrusted publishers once N trusted "
                                   "auditors attest them, require N attestations of every artifact (SECURITY.md).")
    p.add_argument("action", choices=("add", "rm", "ls", "policy"))
    p.add_argument("key", nargs="?", default=None, help="64 hex digits (`kvswap id`) or a peer id (12D3KooW...)")
    p.add_argument("--auditor", action="store_true", help="the key is an auditor's, not a publisher's")
    p.add_argument("--accept-audited", type=int, default=None, metavar="N",
                   help="policy: accept an untrusted publisher's artifact once N trusted auditors attest it (0: never)")
    p.add_argument("--require-audits", type=int, default=None, metavar="N",
                   help="policy: every artifact needs N attestations by trusted auditors (0: none)")
    p.add_argument("--exact-audits", action=argparse.BooleanOptionalAction, default=None,
                   help="policy: count only bit-exact audits")
    add_common(p)
    p.set_defaults(func=cmd_trust)

    p = sub.add_parser("id", help="print this node's public key")
    add_common(p)
    p.set_defaults(func=cmd_id)

