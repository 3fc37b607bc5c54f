#!/usr/bin/env bash
# The whole test suite, on a fresh machine of this kind: fetches the default model and
# llama.cpp's tokenizer test vocabularies (both cached), runs every Rust test (unit, model,
# conformance with llama.cpp, tokenizers, HTTP, end-to-end), the Python end-to-end tests with
# the official `openai` client (their venv is made from PyPI), then the GPU check script on the
# CPU binary.
#
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LLM_WORKER_MODEL=${LLM_WORKER_MODEL:-$(scripts/fetch-default-model.sh | tail -n 1)}
export LLM_WORKER_MODEL
LLM_WORKER_VOCAB_DIR=${LLM_WORKER_VOCAB_DIR:-$(scripts/fetch-llamacpp-vocabs.sh | tail -n 1)}
export LLM_WORKER_VOCAB_DIR

cargo test --all-targets
scripts/test-python.sh
# The GPU check script, run with the CPU binary the tests built, so a GPU session never finds it
# broken (it is what a lent GPU machine runs; see README, GPU builds).
bash scripts/gpu-check.sh --bin target/debug/llm-worker-rbee-cpu --model "$LLM_WORKER_MODEL" \
    --streams 2 --bench-tokens 8
