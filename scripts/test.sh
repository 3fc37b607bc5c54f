#!/usr/bin/env bash
# The whole test suite, on a fresh machine of this kind: fetches the default model (cached),
# runs every Rust test (unit, model, conformance with llama.cpp, HTTP, end-to-end) and the
# Python end-to-end tests with the official `openai` client (their venv is made from PyPI).
#
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LLM_WORKER_MODEL=${LLM_WORKER_MODEL:-$(scripts/fetch-default-model.sh | tail -n 1)}
export LLM_WORKER_MODEL

cargo test --all-targets
scripts/test-python.sh
