#!/usr/bin/env python3
"""A soak test of the worker binary: mixed load for a given time at a given concurrency.

Starts the worker (with an API token and a small queue, so that 503s happen), runs CLIENTS
threads that each loop over a weighted mix of request kinds, samples the worker's RSS and open
file descriptors every --sample-every seconds, stops the worker with SIGTERM and prints one
table: requests by kind and outcome, latency p50/p95, the samples, and the checks.

Kinds:
  job_stream      POST /v1/jobs, read the SSE stream to its end
  job_cancel      POST /v1/jobs, read a few events, DELETE the job, read on to the end
  job_reattach    POST /v1/jobs, read a few events, drop the connection, re-attach with
                  Last-Event-ID and read on to the end
  chat_stream     POST /v1/chat/completions, stream=true, to `data: [DONE]`
  chat_disconnect POST /v1/chat/completions, stream=true, drop after the first chunk
  completion      POST /v1/completions, whole answer
  bad_input       one of a fixed set of bad requests, each with the status it must get

Checks (each a failure, exit code 1): any outcome other than ok or 503-with-Retry-After; a job
stream with other than exactly one terminal event, a gap or repeat in its event ids across a
re-attach, or no sentinel after the terminal event; a stream that never ends; RSS growth after
the first sample over --max-rss-growth; descriptors that do not return to the first sample's
count; a panic in the worker's log; the worker not exiting 0 after SIGTERM.

Usage: scripts/soak.py [--duration 600] [--clients 32] [--bin target/release/llm-worker-rbee-cpu]
                       [--model PATH] [--markdown FILE]
Only the standard library: it runs on a fresh machine before any venv exists.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = {
    "job_stream": 4,
    "job_cancel": 2,
    "job_reattach": 2,
    "chat_stream": 4,
    "chat_disconnect": 2,
    "completion": 3,
    "bad_input": 3,
}
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Explain photosynthesis in one sentence.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
# How long one request may take before the soak calls it a stream that never ends.
REQUEST_TIMEOUT = 180.0


class Failure(Exception):
    """A request whose outcome breaks a rule (not a 503)."""


class Worker:
    def __init__(self, args: argparse.Namespace, token: str) -> None:
        cmd = [
            args.bin,
            "--port", "0",
            "--parallel", str(args.parallel),
            "--queue-capacity", str(args.queue_capacity),
            "--detach-grace", "2s",
            "--job-ttl", "60s",
            "--cache-ram", str(args.cache_ram),
            "--kv-cache-mem", str(args.kv_cache_mem),
        ]
        if args.model:
            cmd += ["--model", args.model]
        env = dict(os.environ, RUST_LOG="warn,llm_worker_rbee::server=info", LLORCH_API_TOKEN=token)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.lines: list[str] = []
        self.addr: str | None = None
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"listening on http://(\S+)", line)
                if m:
                    self.addr = m.group(1)
                if "worker ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(300) or self.addr is None or self.proc.poll() is not None:
            sys.exit("the worker did not start:\n" + "\n".join(self.lines[-20:]))
        self.host, port = self.addr.rsplit(":", 1)
        self.port = int(port)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cache_mib(self, token: str) -> tuple[float, float]:
        """(all KV caches, of which the prefix cache) in MiB, from /metrics."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            c.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
            text = c.getresponse().read().decode()
        finally:
            c.close()

        def gauge(name: str) -> float:
            m = re.search(rf"^{name} (\S+)$", text, re.M)
            return float(m.group(1)) / (1 << 20) if m else float("nan")

        return gauge("rbee_worker_kv_cache_bytes"), gauge("rbee_worker_prefix_cache_bytes")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


class Client:
    def __init__(self, worker: Worker, token: str, rng: random.Random) -> None:
        self.worker = worker
        self.token = token
        self.rng = rng

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.worker.host, self.worker.port,
                                          timeout=REQUEST_TIMEOUT)

    def headers(self, extra: dict | None = None) -> dict:
        h = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        h.update(extra or {})
        return h

    def request(self, method: str, path: str, body=None, headers=None):
        """Returns (status, headers, parsed JSON or text); the connection is closed."""
        c = self.conn()
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            c.request(method, path, body=data, headers=headers if headers is not None else self.headers())
            r = c.getresponse()
            raw = r.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return r.status, r, parsed
        finally:
            c.close()

    @staticmethod
    def busy(status: int, resp) -> bool:
        """A 503 is the worker saying "later": allowed, but only with Retry-After."""
        if status != 503:
            return False
        if not resp.getheader("Retry-After"):
            raise Failure("503 without Retry-After")
        return True

    # -- the job API ---------------------------------------------------------------------

    def create_job(self) -> tuple[str, str] | None:
        body = {
            "operation": "infer",
            "prompt": self.rng.choice(PROMPTS),
            "max_tokens": self.rng.randint(8, 48),
            "temperature": self.rng.choice([0, 0.7]),
        }
        status, resp, v = self.request("POST", "/v1/jobs", body)
        if self.busy(status, resp):
            return None
        if status != 200 or not isinstance(v, dict) or "sse_url" not in v:
            raise Failure(f"POST /v1/jobs: {status} {v}")
        return v["job_id"], v["sse_url"]

    def read_events(self, url: str, last_id: int | None, stop_after: int | None):
        """Reads `url`'s events: a list of (id, name, data) and the sentinel line if it came.
        With `stop_after`, drops the connection after that many token events."""
        c = self.conn()
        extra = {} if last_id is None else {"Last-Event-ID": str(last_id)}
        c.request("GET", url, headers=self.headers(extra))
        r = c.getresponse()
        if r.status != 200:
            raise Failure(f"GET {url}: {r.status} {r.read()[:200]!r}")
        events, sentinel, tokens = [], None, 0
        cur: dict = {}
        try:
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.decode().rstrip("\r\n")
                if line.startswith(":"):
                    continue
                if line == "":
                    if "data" in cur and "event" not in cur:
                        sentinel = cur["data"]
                        break
                    if cur:
                        events.append((int(cur["id"]), cur["event"], cur.get("data", "")))
                        if cur["event"] == "token":
                            tokens += 1
                            if stop_after is not None and tokens >= stop_after:
                                return events, None, True
                    cur = {}
                    continue
                key, _, value = line.partition(":")
                cur[key] = value[1:] if value.startswith(" ") else value
            return events, sentinel, False
        finally:
            c.close()

    def check_job_events(self, events, sentinel) -> None:
        # Log ids may skip what a stream does not carry (e.g. an end-of-generation token with
        # no text), so they must only increase; tokens carry their own index, which must not.
        ids = [e[0] for e in events]
        if not ids or any(a >= b for a, b in zip(ids, ids[1:])):
            raise Failure(f"event ids not increasing, each once: {ids}")
        index = [json.loads(e[2])["i"] for e in events if e[1] == "token"]
        if index != list(range(len(index))):
            raise Failure(f"token indices with a gap or repeat: {index}")
        terminal = [e for e in events if e[1] in ("end", "error")]
        if len(terminal) != 1 or events[-1] is not terminal[0]:
            raise Failure(f"{len(terminal)} terminal events: {[e[1] for e in events]}")
        if sentinel not in ("[DONE]", "[CANCELLED]") and not (sentinel or "").startswith("[ERROR]"):
            raise Failure(f"no sentinel after the terminal event: {sentinel!r}")
        end = json.loads(terminal[0][2])
        if terminal[0][1] == "error":
            if end.get("code") != "CANCELLED":
                raise Failure(f"job ended with an error: {terminal[0][2]}")
        elif end["tokens_out"] - len(index) not in ((0, 1) if end["stop_reason"] == "EOS" else (0,)):
            raise Failure(f"{len(index)} token events for tokens_out {end['tokens_out']}")

    def job_stream(self) -> str:
        created = self.create_job()
        if created is None:
            return "503"
        _, url = created
        events, sentinel, _ = self.read_events(url, None, None)
        self.check_job_events(events, sentinel)
        return "ok"

    def job_cancel(self) -> str:
        created = self.create_job()
        if created is None:
            return "503"
        job_id, url = created
        events, sentinel, dropped = self.read_events(url, None, self.rng.randint(1, 4))
        status, resp, v = self.request("DELETE", f"/v1/jobs/{job_id}")
        # 409: it finished before the cancel arrived.
        if status not in (204, 409):
            raise Failure(f"DELETE: {status} {v}")
        if dropped:
            rest, sentinel, _ = self.read_events(url, events[-1][0], None)
            events += rest
        self.check_job_events(events, sentinel)
        return "ok"

    def job_reattach(self) -> str:
        created = self.create_job()
        if created is None:
            return "503"
        _, url = created
        events, sentinel, dropped = self.read_events(url, None, self.rng.randint(1, 6))
        time.sleep(self.rng.uniform(0, 1.0))  # within --detach-grace: the job goes on
        while dropped:
            more, sentinel, dropped = self.read_events(
                url, events[-1][0], self.rng.choice([None, self.rng.randint(1, 8)]))
            events += more
        self.check_job_events(events, sentinel)
        return "ok"

    # -- the OpenAI API ------------------------------------------------------------------

    def chat_body(self, stream: bool) -> dict:
        return {
            "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
            "max_tokens": self.rng.randint(8, 48),
            "temperature": self.rng.choice([0, 0.7]),
            "stream": stream,
        }

    def chat_stream(self, disconnect: bool = False) -> str:
        c = self.conn()
        try:
            c.request("POST", "/v1/chat/completions", body=json.dumps(self.chat_body(True)),
                      headers=self.headers())
            r = c.getresponse()
            if self.busy(r.status, r):
                return "503"
            if r.status != 200:
                raise Failure(f"chat stream: {r.status} {r.read()[:200]!r}")
            finishes, done = 0, False
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise Failure(f"chat stream error: {chunk}")
                if disconnect:
                    return "ok"
                finishes += sum(1 for ch in chunk.get("choices", []) if ch.get("finish_reason"))
            if not done or finishes != 1:
                raise Failure(f"chat stream: done={done}, {finishes} finish reasons")
            return "ok"
        finally:
            c.close()

    def chat_disconnect(self) -> str:
        return self.chat_stream(disconnect=True)

    def completion(self) -> str:
        body = {"prompt": self.rng.choice(PROMPTS), "max_tokens": self.rng.randint(8, 48),
                "temperature": 0}
        status, resp, v = self.request("POST", "/v1/completions", body)
        if self.busy(status, resp):
            return "503"
        if status != 200 or not v["choices"][0].get("finish_reason"):
            raise Failure(f"completion: {status} {v}")
        return "ok"

    # -- bad input -----------------------------------------------------------------------

    def bad_input(self) -> str:
        bad = [
            ("POST", "/v1/jobs", b"{not json", None, 400),
            ("POST", "/v1/jobs", {"operation": "infer", "prompt": "x", "max_tokens": "many"}, None, 400),
            ("POST", "/v1/jobs", {"operation": "nope"}, None, 400),
            ("POST", "/v1/jobs", {"operation": "infer", "prompt": "x", "temperature": -1}, None, 400),
            ("POST", "/v1/chat/completions", {"messages": "hi"}, None, 400),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                              "n": 99}, None, 400),
            ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10**30}, None, 400),
            ("POST", "/v1/completions", b"x" * ((2 << 20) + 1), None, 413),
            ("GET", "/v1/jobs/no-such-job", None, None, 404),
            ("GET", "/v1/jobs/no-such-job/stream", None, None, 404),
            ("GET", "/v1/models", None, {}, 401),
            ("POST", "/v1/jobs", {"operation": "infer", "prompt": "x"},
             {"Authorization": "Bearer wrong-token-123"}, 401),
        ]
        method, path, body, headers, want = self.rng.choice(bad)
        if headers is not None:
            headers = {"Content-Type": "application/json", **headers}
        status, resp, v = self.request(method, path, body, headers)
        if status != want:
            raise Failure(f"{method} {path}: {status}, wanted {want}: {v}")
        if not (isinstance(v, dict) and "error" in v):
            raise Failure(f"{method} {path}: {status} without the JSON error shape: {v}")
        return "ok"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of load")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--bin", default=str(REPO / "target/release/llm-worker-rbee-cpu"))
    ap.add_argument("--model", default=os.environ.get("LLM_WORKER_MODEL"))
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--queue-capacity", type=int, default=28)
    ap.add_argument("--cache-ram", type=int, default=64,
                    help="MiB of prefix cache: bounded, so that it fills in the first minute")
    ap.add_argument("--kv-cache-mem", type=int, default=48,
                    help="MiB of KV for running requests and the prefix cache together: less "
                         "than --cache-ram, so that kept prefixes are dropped to admit requests")
    ap.add_argument("--sample-every", type=float, default=60)
    ap.add_argument("--max-rss-growth", type=float, default=5.0, help="percent")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()

    token = secrets.token_hex(16)
    worker = Worker(args, token)
    started = time.monotonic()
    stop_at = started + args.duration
    results: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop(n: int) -> None:
        client = Client(worker, token, random.Random(args.seed * 1000 + n))
        kinds, weights = zip(*KINDS.items())
        while time.monotonic() < stop_at:
            kind = client.rng.choices(kinds, weights)[0]
            t0 = time.monotonic()
            try:
                outcome = getattr(client, kind)()
            except Failure as e:
                outcome = "failed"
                with lock:
                    failures.append(f"{kind}: {e}")
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                outcome = "failed"
                with lock:
                    failures.append(f"{kind}: {type(e).__name__}: {e}")
            elapsed = time.monotonic() - t0
            with lock:
                results[kind][outcome] += 1
                if outcome == "ok":
                    latencies[kind].append(elapsed)
            if outcome == "503":
                time.sleep(client.rng.uniform(0.1, 0.5))

    samples: list[tuple[float, int, int, float, float]] = []
    kv_peak = [0.0]

    def sample() -> None:
        # Descriptors first: the /metrics request below is a connection of its own.
        t, rss, fds = time.monotonic() - started, worker.rss_kib(), worker.fds()
        kv, prefix = worker.cache_mib(token)
        samples.append((t, rss, fds, kv, prefix))

    sample()
    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True)
               for n in range(args.clients)]
    for t in threads:
        t.start()
    next_sample = started + args.sample_every
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        kv_peak[0] = max(kv_peak[0], worker.cache_mib(token)[0])
        if time.monotonic() >= next_sample:
            sample()
            next_sample += args.sample_every
        if time.monotonic() > stop_at + REQUEST_TIMEOUT + 30:
            failures.append("clients still busy long after the end: a request never ended")
            break
    # Connections the clients dropped close as the worker notices; give them a few seconds.
    settle = time.monotonic() + 10
    while worker.fds() > samples[0][2] and time.monotonic() < settle:
        time.sleep(0.2)
    sample()
    jobs_checked = sum(results[k]["ok"] for k in ("job_stream", "job_cancel", "job_reattach"))
    exit_code = worker.stop()

    panics = [line for line in worker.lines if "panicked" in line]
    lines = []
    out = lines.append
    total = sum(sum(c.values()) for c in results.values())
    out(f"Soak: {args.duration:.0f} s, {args.clients} clients, --parallel {args.parallel}, "
        f"--queue-capacity {args.queue_capacity}, --cache-ram {args.cache_ram}, "
        f"--kv-cache-mem {args.kv_cache_mem}, {total} requests "
        f"({total / args.duration:.1f}/s)")
    out("")
    out("| kind | ok | 503 | failed | p50 s | p95 s |")
    out("|---|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        c, lat = results[kind], latencies[kind]
        out(f"| {kind} | {c['ok']} | {c['503']} | {c['failed']} | "
            f"{percentile(lat, 50):.2f} | {percentile(lat, 95):.2f} |")
    out("")
    out("| t (s) | RSS (MiB) | open fds | KV caches (MiB) | of which prefix cache (MiB) |")
    out("|---:|---:|---:|---:|---:|")
    for t, rss, fds, kv, prefix in samples:
        out(f"| {t:.0f} | {rss / 1024:.1f} | {fds} | {kv:.1f} | {prefix:.1f} |")
    out("")
    # Growth after the first minute of load: the second sample against the last under load.
    under_load = samples[1:-1] or samples
    base_rss = under_load[0][1]
    growth = 100.0 * (max(s[1] for s in under_load) - base_rss) / max(base_rss, 1)
    fds_back = samples[-1][2] <= samples[0][2]
    checks = [
        (f"no failed requests ({len(failures)})", not failures),
        (f"every job stream ({jobs_checked}): one terminal event, each event once, in order",
         not any(f.startswith("job_") for f in failures)),
        (f"RSS growth after the sample at {under_load[0][0]:.0f} s: {growth:.1f} % "
         f"< {args.max_rss_growth} %",
         growth < args.max_rss_growth),
        (f"open fds back to {samples[0][2]} (now {samples[-1][2]})", fds_back),
        (f"KV caches at most {kv_peak[0]:.1f} MiB (read every 0.5 s) <= --kv-cache-mem "
         f"{args.kv_cache_mem}", kv_peak[0] <= args.kv_cache_mem),
        (f"no panic in the worker's log ({len(panics)})", not panics),
        (f"worker exited 0 after SIGTERM (got {exit_code})", exit_code == 0),
    ]
    for what, ok in checks:
        out(f"- {'PASS' if ok else 'FAIL'}: {what}")
    table = "\n".join(lines)
    print(table)
    for f in failures[:20]:
        print("  failure:", f, file=sys.stderr)
    for p in panics[:5]:
        print("  panic:", p, file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
