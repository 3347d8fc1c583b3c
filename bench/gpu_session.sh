#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md ("On an H100") as one prepared run, for a session that is lent the
# GPU machine (about 15 minutes of device time in all, start included). Prepare here, then run there:
#
#   make gpu-wheels        # .whl/: the packages that machine lacks, and kvswap itself, as x86-64 cp312 wheels
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=570)
#
# Steps, most important first, each under its own timeout so a slow one cannot eat the others; every step
# writes under $OUT as it goes (bench reuse saves its JSON after every length), so a run cut short keeps
# what it measured:
#   1. bench reuse --device cuda: prefill, eager and compiled step, previous and current verified load,
#      load + suffix, and the read+sha256 / pinned-copy / limit rows, 255 ... 32,768 tokens (reuse.json)
#   2. kvswap exact on the GPU: tiny-qwen3 (eager and compiled, with a question and a prefix) and the
#      Qwen3-4B architecture in bf16 with the compiled step (exact-*.json)
#   3. bench loadpath: the CPU path, previous vs current, on that machine's 16-core CPU (loadpath.json)
#   4. the engine tests on that CPU with the GPU hidden: a second x86 CPU for the exactness claims
# Locally (no GPU) `OUT=/tmp/gpu bash bench/gpu_session.sh` runs the same steps on the CPU as a dry run.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/session.log"; }

OUT=$(cd "$OUT" && pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # kvswap comes from its wheel (which maps node/ and protocol/ into kvswap.*): run from a folder without
    # the source package, which would shadow it
    RUN=/tmp/kvswap-run && rm -rf "$RUN" && mkdir -p "$RUN"
    tar --exclude=./kvswap --exclude=./node --exclude=./protocol --exclude=./.git --exclude='./.venv*' \
        --exclude=./.whl -cf - . | tar -xf - -C "$RUN" && cd "$RUN" || exit 1
fi
PY=${PY:-python3}
export KVSWAP_MODEL_CACHE=${KVSWAP_MODEL_CACHE:-/tmp/kvswap-models}
# a CPU dry run keeps every step short; on the GPU the lengths go up to 32k
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CUDA=1; REUSE_ARGS=(--device cuda --repeats 3); BIG_EXACT=1
else
    CUDA=0; REUSE_ARGS=(--model tiny-qwen3 --quick --repeats 1); BIG_EXACT=0
fi

log "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log "1. bench reuse ${REUSE_ARGS[*]}"
timeout 330 "$PY" -m bench reuse "${REUSE_ARGS[@]}" --out "$OUT/reuse.json" > "$OUT/reuse.txt" 2>&1
log "   rc=$? $(tail -n 1 "$OUT/reuse.txt")"

log "2. kvswap exact"
DOC="$OUT/doc.txt"
cat README.md ARCHITECTURE.md | head -c 6000 > "$DOC"
QUESTION=" Question: what does a consumer skip? Answer:"
for decode in eager compiled; do
    [ "$decode" = compiled ] && [ "$CUDA" = 0 ] && decode=static
    timeout 120 "$PY" -m kvswap exact --model tiny-qwen3 --dtype bf16 --doc "$DOC" --question "$QUESTION" \
        --prefix 300 --decode "$decode" --home "$OUT/home" --json > "$OUT/exact-tiny-$decode.json" 2>"$OUT/exact-tiny-$decode.err"
    log "   tiny-qwen3 $decode rc=$?"
done
if [ "$BIG_EXACT" = 1 ]; then
    timeout 240 "$PY" -m kvswap exact --model qwen3-4b-arch --dtype bf16 --doc "$DOC" --question "$QUESTION" \
        --decode compiled --home "$OUT/home" --json > "$OUT/exact-qwen3-4b-arch-compiled.json" \
        2>"$OUT/exact-qwen3-4b-arch-compiled.err"
    log "   qwen3-4b-arch compiled rc=$?"
fi

log "3. bench loadpath --quick (CPU path)"
timeout 90 "$PY" -m bench loadpath --quick --out "$OUT/loadpath.json" > "$OUT/loadpath.txt" 2>&1
log "   rc=$? $(tail -n 1 "$OUT/loadpath.txt")"

log "4. engine tests on this CPU (GPU hidden)"
CUDA_VISIBLE_DEVICES= timeout 150 "$PY" -m pytest -q -m "engine and not slow" -p no:cacheprovider \
    $(grep -l "mark.engine\|pytestmark = pytest.mark.engine" tests/test_*.py) \
    > "$OUT/engine-tests.txt" 2>&1
log "   rc=$? $(tail -n 1 "$OUT/engine-tests.txt")"
rm -rf "$OUT/home"
log "done"
