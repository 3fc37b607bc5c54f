#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, the built cuda binary and the model, and no Rust
# toolchain or registry access: starts the worker on the GPU, runs one greedy generation, the
# conformance corpus and a load benchmark through the job API, and prints tokens/s.
#
# Usage:  scripts/gpu-check.sh [--bin PATH] [--model PATH] [--corpus PATH] [--device N]
#                              [--streams N] [--bench-tokens N] [--out DIR] [-- WORKER_ARGS...]
# Defaults look beside this script first (the layout scripts/gpu-bundle.sh makes), then in the
# repo (target/cuda/release, ~/.cache/llm-worker-rbee/models, shared/conformance).
# Needs: bash, python3 (standard library only), the NVIDIA driver (>= 580) and the CUDA 13
# libraries the binary links (cudart, cublas with cublasLt, curand), found through the loader or
# in the usual CUDA and pip locations. --bin with the cpu binary runs the same steps on a CPU
# (a test of this script). Logs and a summary go to --out (default: $OUT, if set).
# Exit status: 0 when every step passed, 1 when a step failed or could not run.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

BIN="" MODEL="" CORPUS="" DEVICE=0 STREAMS=16 BENCH_TOKENS=128 OUT_DIR=${OUT:-}
WORKER_ARGS=()
LISTEN_TIMEOUT=60     # seconds until the worker logs its port
READY_TIMEOUT=600     # seconds until /health is ready (model load and CUDA start)
STEP_TIMEOUT=600      # seconds any one client step may take
READ_TIMEOUT=300      # seconds one HTTP read may take (the first kernels' PTX JIT happens inside one)

while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --corpus) CORPUS=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --streams) STREAMS=$2; shift 2 ;;
        --bench-tokens) BENCH_TOKENS=$2; shift 2 ;;
        --out) OUT_DIR=$2; shift 2 ;;
        --) shift; WORKER_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { printf '[gpu-check] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
first_file() { local f; for f in "$@"; do [[ -f "$f" ]] && { echo "$f"; return 0; }; done; return 1; }

[[ -n "$BIN" ]] || BIN=$(first_file "$HERE/llm-worker-rbee-cuda" "$REPO/target/cuda/release/llm-worker-rbee-cuda") \
    || die "no llm-worker-rbee-cuda beside this script or in target/cuda/release; pass --bin"
[[ -n "$MODEL" ]] || MODEL=$(first_file "$HERE"/*.gguf "$HOME/.cache/llm-worker-rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf") \
    || die "no .gguf beside this script or in ~/.cache/llm-worker-rbee/models; pass --model"
[[ -n "$CORPUS" ]] || CORPUS=$(first_file "$HERE/generate.json" "$REPO/shared/conformance/generate.json" "$REPO/../shared/conformance/generate.json") \
    || die "no generate.json found; pass --corpus"
[[ -x "$BIN" ]] || die "$BIN is not an executable file"
[[ -f "$MODEL" ]] || die "model $MODEL not found"
command -v python3 >/dev/null || die "python3 not found"
PY_DIR=$(first_file "$HERE/conformance_check.py" "$HERE/scripts/conformance_check.py") || die "conformance_check.py not found beside this script"
PY_DIR=$(dirname "$PY_DIR")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
WORKER_LOG="$WORK/worker.log"
SUMMARY="$WORK/summary.txt"
WORKER_PID=""

stop_worker() {
    if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        kill -TERM "$WORKER_PID" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$WORKER_PID" 2>/dev/null || true
    fi
    WORKER_PID=""
}
finish() {
    local rc=$?
    stop_worker
    if [[ -n "$OUT_DIR" ]]; then
        mkdir -p "$OUT_DIR"
        cp -f "$WORKER_LOG" "$OUT_DIR/worker.log" 2>/dev/null || true
        cp -f "$SUMMARY" "$OUT_DIR/gpu-check-summary.txt" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 && -s "$WORKER_LOG" ]]; then
        log "last lines of the worker's log:"
        tail -n 25 "$WORKER_LOG" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# --- libraries -------------------------------------------------------------------------------
# The binary links the CUDA 13 runtime libraries dynamically and no rpath points at them. Where
# the loader does not find one, look in the toolkit and in pip's nvidia wheels (the GPU image's
# PyTorch venv carries them) and add that folder to LD_LIBRARY_PATH.
missing_libs() { ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}'; }
candidate_dirs() {
    local d
    for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13.0 /usr/local/nvidia; do
        [[ -n "$d" ]] && printf '%s\n' "$d/lib64" "$d/lib" "$d/targets/x86_64-linux/lib"
    done
    python3 - 2>/dev/null <<'PY' || true
import glob, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()])
roots.update(glob.glob("/opt/*/.venv/lib/python3*/site-packages"))
for r in sorted(roots):
    for d in sorted(glob.glob(r + "/nvidia/cu13/lib") + glob.glob(r + "/nvidia/*/lib")):
        print(d)
PY
}
if [[ -n "$(missing_libs)" ]]; then
    mapfile -t dirs < <(candidate_dirs)
    for lib in $(missing_libs); do
        for d in "${dirs[@]}"; do
            if [[ -f "$d/$lib" ]]; then
                log "using $d for $lib"
                export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
                break
            fi
        done
    done
fi
if [[ -n "$(missing_libs)" ]]; then
    die "the loader cannot find: $(missing_libs | tr '\n' ' ')(set LD_LIBRARY_PATH to the CUDA 13 libraries)"
fi

{
    echo "binary: $BIN ($("$BIN" --version 2>/dev/null || echo '?'))"
    echo "model:  $MODEL ($(stat -c %s "$MODEL") bytes)"
    if command -v nvidia-smi >/dev/null; then
        echo "gpu:    $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader -i "$DEVICE" 2>/dev/null || echo '?')"
    fi
} | tee "$SUMMARY" >&2

# --- start the worker ------------------------------------------------------------------------
# --port 0: the kernel picks a free port and the worker logs it ("listening on http://ADDR").
log "starting the worker on device $DEVICE"
"$BIN" --model "$MODEL" --device "$DEVICE" --host 127.0.0.1 --port 0 \
    --parallel "$STREAMS" --job-ttl 1m "${WORKER_ARGS[@]}" >"$WORKER_LOG" 2>&1 &
WORKER_PID=$!

PORT=""
for _ in $(seq 1 $((LISTEN_TIMEOUT * 4))); do
    PORT=$(sed -n 's/.*listening on http:\/\/[^ ]*:\([0-9][0-9]*\).*/\1/p' "$WORKER_LOG" | head -n1)
    [[ -n "$PORT" ]] && break
    kill -0 "$WORKER_PID" 2>/dev/null || die "the worker exited before listening"
    sleep 0.25
done
[[ -n "$PORT" ]] || die "the worker did not log its port within ${LISTEN_TIMEOUT}s"
URL="http://127.0.0.1:$PORT"
log "worker listening on $URL; waiting for the model"

ready=0
start=$SECONDS
while (( SECONDS - start < READY_TIMEOUT )); do
    kill -0 "$WORKER_PID" 2>/dev/null || die "the worker exited while loading"
    code=$(python3 - "$URL/health" <<'PY'
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print(0)
PY
)
    if [[ "$code" == 200 ]]; then ready=1; break; fi
    sleep 1
done
(( ready )) || die "/health not ready within ${READY_TIMEOUT}s"
echo "ready:  model loaded in $((SECONDS - start))s" | tee -a "$SUMMARY" >&2

# --- the checks ------------------------------------------------------------------------------
# A step that could not run (timeout, refused request, dead worker) stops the check; failed
# conformance cases (exit 1 of conformance_check.py) are reported and the benchmark still runs,
# so one lease gives every number.
FAILED_STEPS=()
step() {
    local name=$1 soft_rc=$2; shift 2
    log "$name"
    local rc=0
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$WORK/step.out" || rc=$?
    [[ $rc -eq 124 ]] && die "$name: no result within ${STEP_TIMEOUT}s"
    kill -0 "$WORKER_PID" 2>/dev/null || die "the worker died during: $name"
    if [[ $rc -ne 0 ]]; then
        [[ "$rc" == "$soft_rc" ]] || die "$name (exit $rc)"
        FAILED_STEPS+=("$name")
    fi
}

step "greedy generation (1 stream, up to 64 tokens)" - \
    python3 "$PY_DIR/load_bench.py" --url "$URL" --streams 1 --max-tokens 64 \
    --prompt "What is the capital of France?" --show-text --timeout "$READ_TIMEOUT"
echo "greedy: $(tail -n1 "$WORK/step.out")" >>"$SUMMARY"

step "conformance corpus ($CORPUS)" 1 \
    python3 "$PY_DIR/conformance_check.py" --url "$URL" --corpus "$CORPUS" --timeout "$READ_TIMEOUT"
grep -E '^(case .* FAIL|conformance:)' "$WORK/step.out" >>"$SUMMARY" || true

step "load benchmark ($STREAMS streams x $BENCH_TOKENS tokens)" - \
    python3 "$PY_DIR/load_bench.py" --url "$URL" --streams "$STREAMS" --max-tokens "$BENCH_TOKENS" \
    --timeout "$READ_TIMEOUT"
echo "load:   $(tail -n1 "$WORK/step.out")" >>"$SUMMARY"

stop_worker
echo
echo "=== gpu-check summary ==="
cat "$SUMMARY"
if [[ ${#FAILED_STEPS[@]} -gt 0 ]]; then
    echo "gpu-check: FAILED: ${FAILED_STEPS[*]}"
    exit 1
fi
echo "gpu-check: all steps passed"
