#!/usr/bin/env bash
# Collects what scripts/gpu-check.sh needs on a GPU machine that has no Rust toolchain and no
# registry access (the cuda binary, the default model, the conformance corpus and the check's
# scripts) into target/gpu-bundle/, packed and split so that each piece fits one call of the
# device tool (its carry limit is 64 MiB per call, working tree included; the model alone is
# 94 MiB, so the bundle always needs two calls). Prints the calls to make.
#
# Usage:  scripts/gpu-bundle.sh [--bin PATH] [--model PATH] [--corpus PATH] [--part-mib N]
# Build first:  eval "$(scripts/setup-cuda-toolchain.sh)" &&
#               CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --bin llm-worker-rbee-cuda
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="${CARGO_TARGET_DIR:-$REPO/target/cuda}/release/llm-worker-rbee-cuda"
MODEL=""
CORPUS=""
# Leaves room in each call for the working tree that travels with it (a few MiB today).
PART_MIB=56
DEST="$REPO/target/gpu-bundle"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --corpus) CORPUS=$2; shift 2 ;;
        --part-mib) PART_MIB=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu-bundle: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { printf '[gpu-bundle] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

[[ -x "$BIN" ]] || die "no cuda binary at $BIN (build it first, see --help)"
[[ -n "$MODEL" ]] || MODEL=$("$REPO/scripts/fetch-default-model.sh" | tail -n1)
[[ -f "$MODEL" ]] || die "model $MODEL not found"
if [[ -z "$CORPUS" ]]; then
    for c in "$REPO/shared/conformance/generate.json" "$REPO/../shared/conformance/generate.json"; do
        [[ -f "$c" ]] && { CORPUS=$c; break; }
    done
fi
[[ -f "$CORPUS" ]] || die "conformance corpus generate.json not found; pass --corpus"

rm -rf "$DEST"
files="$DEST/files"
mkdir -p "$files"
# Line tables are of no use without the sources there; dropping them halves the binary.
objcopy --strip-debug "$BIN" "$files/llm-worker-rbee-cuda"
cp "$MODEL" "$files/$(basename "$MODEL")"
cp "$CORPUS" "$files/generate.json"
cp "$REPO/scripts/gpu-check.sh" "$REPO/scripts/conformance_check.py" "$REPO/scripts/load_bench.py" "$files/"
{
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "built:  $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ)"
    echo "needs:  NVIDIA driver >= 580 (CUDA 13.0), compute capability 9.0 (H100/H200);"
    echo "        $(objdump -p "$BIN" | awk '/NEEDED/ && /libcu/ {printf "%s ", $2}')(CUDA 13 runtime libraries)"
    (cd "$files" && sha256sum -- *)
} >"$DEST/MANIFEST"
mv "$DEST/MANIFEST" "$files/MANIFEST"
chmod -R u+w "$files"

log "binary $(mib "$(stat -c %s "$BIN")") ($(mib "$(stat -c %s "$files/llm-worker-rbee-cuda")") without debug info), model $(mib "$(stat -c %s "$MODEL")")"

# gzip shrinks the binary (PTX is text) and barely touches the model; one stream keeps the
# unpacking a single command.
tar -C "$files" -czf "$DEST/bundle.tgz" .
rm -rf "$files"
split -b "${PART_MIB}M" -d -a 1 "$DEST/bundle.tgz" "$DEST/bundle.tgz.part-"
(cd "$DEST" && sha256sum bundle.tgz.part-*) >"$DEST/parts.sha256"
rm -f "$DEST/bundle.tgz"

parts=("$DEST"/bundle.tgz.part-*)
n=${#parts[@]}
for i in $(seq 1 "$n"); do
    mkdir -p "$DEST/call$i"
    mv "${parts[$((i - 1))]}" "$DEST/call$i/"
done
mv "$DEST/parts.sha256" "$DEST/call$n/"

total=$(du -cb "$DEST"/call*/* | tail -n1 | cut -f1)
tree=$(cd "$REPO" && { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -n1 | cut -f1)
log "bundle $(mib "$total") in $n parts of at most $PART_MIB MiB; the working tree adds $(mib "$tree") to each call"

stash=/root/llm-gpu
cat <<EOF

Device calls, one right after the other (a warm machine is given back after 30 s idle, and
with it the earlier parts; if the last call says a part is missing, make all of them again):
EOF
for i in $(seq 1 "$n"); do
    if [[ $i -lt $n ]]; then
        cmd="mkdir -p $stash && cp target/gpu-bundle/call$i/* $stash/ && ls -l $stash"
    else
        cmd="set -e; mkdir -p $stash && cp target/gpu-bundle/call$i/* $stash/ && cd $stash && sha256sum -c parts.sha256 && cat bundle.tgz.part-* | tar -xz && ./gpu-check.sh --out \"\$OUT\""
    fi
    printf '  %d. run  carry=["target/gpu-bundle/call%d"]  timeout_s=%s\n     command: %s\n' \
        "$i" "$i" "$([[ $i -lt $n ]] && echo 120 || echo 540)" "$cmd"
done
