#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer test suite (the vocabulary-only GGUFs `models/ggml-vocab-*.gguf`
# with their `.inp` texts and `.out` token ids, MIT) from the pinned llama-cpp-python source
# package on PyPI, verifies the package's sha256 and caches the files outside git, for
# tests/llamacpp_vocabs.rs.
#
# Usage:  scripts/fetch-llamacpp-vocabs.sh
# Output: the cache directory on the last line of stdout; progress on stderr.
# Env:    LLM_WORKER_CACHE  cache directory (default: ~/.cache/llm-worker-rbee)
#
# Idempotent: a complete cache is used as is. A source package that
# ../shared/tools/build-llamacpp-reference.sh already downloaded (~/.cache/llamacpp-ref) is
# reused instead of downloading it again.
set -euo pipefail

PACKAGE=llama-cpp-python
VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SDIST_NAME="llama_cpp_python-$VERSION.tar.gz"

CACHE=${LLM_WORKER_CACHE:-"$HOME/.cache/llm-worker-rbee"}
DEST="$CACHE/llamacpp-vocabs"
STAMP="$DEST/.complete-$VERSION"

log() { printf '[fetch-llamacpp-vocabs] %s\n' "$*" >&2; }

if [[ -f "$STAMP" ]]; then
    echo "$DEST"
    exit 0
fi

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

sdist="$HOME/.cache/llamacpp-ref/$SDIST_NAME"
if [[ ! -f "$sdist" ]] || [[ $(sha256sum "$sdist" | cut -d' ' -f1) != "$SDIST_SHA256" ]]; then
    PYTHON=${PYTHON:-python3}
    log "downloading $PACKAGE==$VERSION (source package, ~75 MB) with pip"
    "$PYTHON" -m pip download "$PACKAGE==$VERSION" --no-deps --no-binary "$PACKAGE" \
        -d "$work" --quiet >&2
    sdist=$(find "$work" -maxdepth 1 -type f -iname "llama[-_]cpp[-_]python-$VERSION.tar.gz" -print -quit)
    [[ -n "$sdist" ]] || { log "pip download produced no source package"; exit 1; }
    actual=$(sha256sum "$sdist" | cut -d' ' -f1)
    if [[ "$actual" != "$SDIST_SHA256" ]]; then
        log "sha256 mismatch: got $actual, want $SDIST_SHA256"
        exit 1
    fi
fi

log "extracting the vocabularies from $sdist"
tar -xzf "$sdist" -C "$work" --wildcards "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*"
rm -rf "$DEST"
mkdir -p "$DEST"
mv "$work/llama_cpp_python-$VERSION/vendor/llama.cpp/models/"ggml-vocab-* "$DEST/"
[[ -f "$DEST/ggml-vocab-llama-spm.gguf.out" ]] || { log "unexpected source package layout"; exit 1; }
touch "$STAMP"
log "cached $(find "$DEST" -name 'ggml-vocab-*' | wc -l) files in $DEST"
echo "$DEST"
