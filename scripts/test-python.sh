#!/usr/bin/env bash
# End-to-end tests of the OpenAI-compatible API with the official `openai` Python package:
# builds the cpu binary, makes (once) a virtual environment with tests/python/requirements.txt
# from PyPI, and runs pytest on tests/python, which starts the binary on an ephemeral port with
# a random API token and the default model.
#
# Usage:  scripts/test-python.sh [pytest arguments...]     e.g. scripts/test-python.sh -k logprobs
# Env:    PYTHON              interpreter for the venv (default: python3, 3.9 or newer)
#         LLM_WORKER_PY_VENV  the venv (default: $CARGO_TARGET_DIR or target/, then py-venv)
#         LLM_WORKER_MODEL    model to serve (default: the cached default model, fetched once)
#         CARGO_TARGET_DIR    honoured for the binary and the default venv location
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=${LLM_WORKER_PY_VENV:-$TARGET/py-venv}
REQUIREMENTS=tests/python/requirements.txt
PYTHON=${PYTHON:-python3}

log() { printf '[test-python] %s\n' "$*" >&2; }

# The venv is rebuilt only when the requirements change.
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" || ! -f "$stamp" || $(cat "$stamp") != "$want" ]]; then
    log "creating $VENV from $REQUIREMENTS"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    echo "$want" > "$stamp"
fi

log "building llm-worker-rbee-cpu"
cargo build --quiet --bin llm-worker-rbee-cpu
export LLM_WORKER_BIN="$TARGET/debug/llm-worker-rbee-cpu"

if [[ -z "${LLM_WORKER_MODEL:-}" ]]; then
    LLM_WORKER_MODEL=$(scripts/fetch-default-model.sh | tail -n 1)
    export LLM_WORKER_MODEL
fi

exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/python "$@"
