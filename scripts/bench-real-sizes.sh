#!/usr/bin/env bash
# Ours against llama.cpp on the real-size model files (BENCHMARKS.md, "Real sizes"), each file
# first dropped from the page cache and read again, so that both programs stream it from the
# same page-cache state (the state moves decode speed by ~10 %; dropping needs root).
#
#   scripts/bench-real-sizes.sh LLAMA_BENCH FILE...
set -euo pipefail
llama_bench=$1
shift
bench=target/release/llm-worker-rbee-bench
cargo build --release --bin llm-worker-rbee-bench >&2
for f in "$@"; do
    sync
    if ! echo 1 > /proc/sys/vm/drop_caches 2>/dev/null; then
        echo "cannot drop the page cache (not root): $f is measured in whatever state it is in" >&2
    fi
    cat "$f" > /dev/null
    echo "=== $f"
    "$bench" -m "$f" -p 512 -n 128 -t 2 -r 2 --llama-bench "$llama_bench" | tail -n 7
done
