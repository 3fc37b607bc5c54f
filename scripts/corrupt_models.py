#!/usr/bin/env python3
"""Starts the worker binary on damaged copies of a GGUF model and on paths that are not model
files, and prints what each start did: refused at load (exit code and the reason it logged),
or served (then one completion is asked for and its status recorded).

A start passes when the worker either refuses with exit code 1 or 2 and a reason, or serves
and answers the completion with 200 or a JSON error; never a panic, a crash by signal, a hang
past the load timeout, or a 5xx without the error shape.

Usage: scripts/corrupt_models.py [--bin target/release/llm-worker-rbee-cpu] [--model PATH]
                                 [--markdown FILE]
Only the standard library.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOAD_TIMEOUT_S = 20


def variants(model: bytes, rng: random.Random, tmp: Path):
    """(name, path) of each damaged or odd model to start on."""
    def write(name: str, data: bytes) -> Path:
        p = tmp / f"{name}.gguf"
        p.write_bytes(data)
        return p

    size = len(model)
    # The header: magic, version, tensor count, metadata count; then metadata and tensor infos.
    n_tensors, n_kv = struct.unpack_from("<QQ", model, 8)
    yield "empty file", write("empty", b"")
    for cut in (3, 8, 16, 24, 100, 1000, 10_000, 100_000, size // 2, size - 1):
        yield f"truncated at {cut} B", write(f"cut{cut}", model[:cut])
    yield "wrong magic", write("magic", b"GGUX" + model[4:])
    for version in (0, 1, 4, 0xFFFFFFFF):
        yield f"version {version}", write(f"v{version}", model[:4] + struct.pack("<I", version) + model[8:])
    for what, offset, value in (
        ("tensor count 2^63", 8, 1 << 63),
        ("tensor count + 1", 8, n_tensors + 1),
        ("metadata count 2^40", 16, 1 << 40),
        ("metadata count + 1", 16, n_kv + 1),
        ("metadata count 0", 16, 0),
    ):
        yield what, write(what.replace(" ", "_").replace("^", ""),
                          model[:offset] + struct.pack("<Q", value) + model[offset + 8:])
    # Flipped bytes in the metadata and tensor-info region (the default model's first 1.78 MB
    # hold the tokenizer's vocabulary and merges, then the tensor infos), and in the tensor
    # data (past 2 MiB).
    head = min(size, 1_700_000)
    data_start = min(size, 2 << 20)
    for i in range(16):
        data = bytearray(model)
        for _ in range(1 + i % 4):
            data[rng.randrange(24, head)] ^= 1 << rng.randrange(8)
        yield f"bit flips in the header region #{i}", write(f"hflip{i}", bytes(data))
    for i in range(8):
        data = bytearray(model)
        at = rng.randrange(24, head)
        data[at:at + 8] = b"\xff" * 8
        yield f"8 bytes of 0xff in the header region #{i}", write(f"hff{i}", bytes(data))
    for i in range(4):
        data = bytearray(model)
        for _ in range(64):
            data[rng.randrange(data_start, size)] = rng.randrange(256)
        yield f"random bytes in the tensor data #{i}", write(f"dflip{i}", bytes(data))
    data = bytearray(model)
    data[data_start:] = b"\xff" * (size - data_start)
    yield "tensor data all 0xff (NaN f16 scales)", write("dnan", bytes(data))
    yield "random bytes, model's size", write("random", rng.randbytes(size))
    yield "/dev/zero", Path("/dev/zero")
    yield "/dev/null", Path("/dev/null")
    fifo = tmp / "fifo.gguf"
    os.mkfifo(fifo)
    yield "a FIFO", fifo
    empty_dir = tmp / "empty-dir"
    empty_dir.mkdir()
    yield "an empty directory", empty_dir
    loop = tmp / "loop.gguf"
    loop.symlink_to(loop)
    yield "a symlink loop", loop
    yield "a missing file", tmp / "missing.gguf"
    unreadable = write("unreadable", model[:1000])
    unreadable.chmod(0)
    yield "an unreadable file (mode 000; root reads it anyway)", unreadable


def start(binary: str, path: Path) -> dict:
    env = dict(os.environ, RUST_LOG="info")
    env.pop("LLORCH_API_TOKEN", None)
    proc = subprocess.Popen(
        [binary, "--port", "0", "--model", str(path), "--load-timeout", f"{LOAD_TIMEOUT_S}s"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    lines: list[str] = []
    state = {"addr": None, "ready": threading.Event()}

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())
            m = re.search(r"listening on http://(\S+)", line)
            if m:
                state["addr"] = m.group(1)
            if "worker ready" in line:
                state["ready"].set()
        state["ready"].set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    state["ready"].wait(LOAD_TIMEOUT_S + 15)
    result: dict = {}
    if proc.poll() is None and any("worker ready" in line for line in lines):
        host, port = state["addr"].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            c.request("POST", "/v1/completions",
                      body=json.dumps({"prompt": "Hello", "max_tokens": 8, "temperature": 0}),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            body = r.read()
            try:
                shaped = "error" in json.loads(body) if r.status >= 400 else True
            except ValueError:
                shaped = False
            result["served"] = f"{r.status}" + ("" if shaped else " (not JSON)")
            result["ok"] = r.status == 200 or (400 <= r.status < 600 and shaped)
        except (OSError, http.client.HTTPException) as e:
            result["served"] = f"request failed: {e}"
            result["ok"] = False
        finally:
            c.close()
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(LOAD_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "hung"
    reader.join(5)
    errors = [re.sub(r"^\S+\s+ERROR\s+\S+:\s*", "", line) for line in lines if " ERROR " in line]
    panicked = any("panicked" in line for line in lines)
    result["exit"] = code
    result["reason"] = errors[-1] if errors else ""
    if "served" not in result:
        result["ok"] = code in (1, 2) and bool(result["reason"]) and not panicked
    result["ok"] = result["ok"] and not panicked
    result["panicked"] = panicked
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=str(REPO / "target/release/llm-worker-rbee-cpu"))
    ap.add_argument("--model", default=os.environ.get("LLM_WORKER_MODEL"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    if not args.model:
        args.model = subprocess.run([str(REPO / "scripts/fetch-default-model.sh")], check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1]
    model = Path(args.model).read_bytes()
    rng = random.Random(args.seed)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in variants(model, rng, Path(tmp)):
            t0 = time.monotonic()
            r = start(args.bin, path)
            took = time.monotonic() - t0
            failed += not r["ok"]
            outcome = f"served, completion {r['served']}" if "served" in r else f"exit {r['exit']}"
            reason = r["reason"].replace("|", "\\|")[:110]
            rows.append(f"| {name} | {outcome} | {took:.1f} | {reason} | "
                        f"{'PASS' if r['ok'] else 'FAIL'} |")
            print(rows[-1], flush=True)
    table = "\n".join([
        f"{len(rows)} starts on damaged or odd model paths, {failed} failed",
        "",
        "| model | outcome | s | reason logged | |",
        "|---|---|---:|---|---|",
        *rows,
    ])
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(f"{len(rows)} starts, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
