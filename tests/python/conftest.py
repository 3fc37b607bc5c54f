"""Starts the real worker binary once per test session on an ephemeral port, with an API token.

Environment (scripts/test-python.sh sets them):
  LLM_WORKER_BIN    the llm-worker-rbee-cpu binary to run (required)
  LLM_WORKER_MODEL  the GGUF model (default: the binary's own default, fetched if needed)
"""

import collections
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import urllib.request

import openai
import pytest

START_TIMEOUT_S = 180
LISTENING = re.compile(r"listening on http://([0-9.]+):(\d+)")


class Worker:
    def __init__(self, base_url: str, token: str, process: subprocess.Popen, log):
        self.base_url = base_url
        self.token = token
        self.process = process
        self.log = log

    def tail(self) -> str:
        return "\n".join(self.log)


def _wait_for_port(process, log, lines_seen: threading.Event, found: dict) -> None:
    for raw in process.stderr:
        line = raw.decode("utf-8", "replace").rstrip()
        log.append(line)
        m = LISTENING.search(line)
        if m and "port" not in found:
            found["port"] = int(m.group(2))
            lines_seen.set()
    lines_seen.set()


@pytest.fixture(scope="session")
def worker():
    binary = os.environ.get("LLM_WORKER_BIN")
    if not binary:
        pytest.fail("LLM_WORKER_BIN is not set: run scripts/test-python.sh")
    token = secrets.token_hex(16)
    env = dict(os.environ, LLORCH_API_TOKEN=token, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    args = [binary, "--host", "127.0.0.1", "--port", "0", "--parallel", "2", "--ctx-size", "2048"]
    if os.environ.get("LLM_WORKER_MODEL"):
        args += ["--model", os.environ["LLM_WORKER_MODEL"]]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = collections.deque(maxlen=200)
    seen = threading.Event()
    found = {}
    reader = threading.Thread(target=_wait_for_port, args=(process, log, seen, found), daemon=True)
    reader.start()
    try:
        if not seen.wait(START_TIMEOUT_S) or "port" not in found:
            pytest.fail("the worker did not report its port:\n" + "\n".join(log))
        base_url = f"http://127.0.0.1:{found['port']}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the worker did not become healthy:\n" + "\n".join(log))
            time.sleep(0.2)
        yield Worker(base_url, token, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def client(worker):
    # No retries: a 503 must show up as one, not as a slow test.
    return openai.OpenAI(base_url=worker.base_url + "/v1", api_key=worker.token, max_retries=0)


@pytest.fixture(scope="session")
def model(client):
    return client.models.list().data[0].id
