#!/usr/bin/env python3
"""HTTP load benchmark: our worker and llama.cpp's llama-server, same machine, same run.

Starts each server in turn (never both at once), drives `POST /v1/completions` with streaming
requests and prints a markdown table of both servers and the ours/llama.cpp ratios, with the
exact commands, ready to paste into BENCHMARKS.md.

    python3 scripts/bench_http.py                                   # 16 streams x 128 tokens
    python3 scripts/bench_http.py --streams 4 --max-tokens 32       # a quick check
    python3 scripts/bench_http.py --only ours --json /tmp/ours.json

Scenarios, each against each server, after one warm-up request (excluded):
  concurrent  --streams requests sent at once (default 16);
  single      one request at a time, --single-runs of them (default 3).
Every request: `"stream": true, "max_tokens": M, "ignore_eos": true, "temperature": 0`,
`"stream_options": {"include_usage": true}`, a prompt of about --prompt-tokens tokens that is
distinct per request (its index comes first), and `"cache_prompt": false` for llama-server.

Definitions (all times on this client's monotonic clock; percentiles interpolate linearly
between the closest ranks, as numpy's default):
  content chunk   an SSE `data:` event whose choices[0].text is not empty. Both servers send one
                  per generated token (text a detokenizer holds back, e.g. half a UTF-8
                  character, arrives with a later chunk).
  tokens          usage.completion_tokens of the request (both servers report it in the
                  stream); the count of content chunks only when usage is missing.
  TTFT            from just before the request is written to the arrival of its first content
                  chunk (includes queueing for a slot and the prompt's prefill).
  ITL             the gaps between consecutive content chunks of one request, pooled over all
                  requests of the scenario.
  decode tok/s    per request, (tokens - 1) / (last content chunk - first content chunk).
  aggregate tok/s sum of tokens over the scenario / (last request's end - first request's send).
  peak RSS        VmHWM of the server process from /proc/PID/status, read just before it is
                  stopped (after both scenarios).
  other CPU       per scenario, the CPU time this machine spent outside the server and this
                  client (from /proc/stat), in cores; above ~0.2 the numbers are noisy (someone
                  is compiling: llama.cpp's spinning threads suffer most). Before each scenario
                  the script waits (--wait-quiet) for --quiet-window seconds below
                  --quiet-threshold, and a scenario that was noisy anyway is measured again
                  (--retries), the quietest attempt kept.

Servers are started with --port 0 and found by their "listening on http://HOST:PORT" log line
(both print one), so no port is fixed; each must answer /health with 200 within
--ready-timeout. They are stopped with SIGTERM, then SIGKILL, on every exit path.

Exit status: 0 when every request ended normally with max_tokens tokens, 1 when one did not,
2 when a server could not be started or used.
"""

import argparse
import atexit
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OURS_BIN = REPO / "target" / "release" / "llm-worker-rbee-cpu"
LLAMACPP_BUILD_SCRIPTS = [
    REPO.parent / "shared" / "tools" / "build-llamacpp-reference.sh",
    REPO / "shared" / "tools" / "build-llamacpp-reference.sh",
]
DEFAULT_LLAMA_SERVER = (
    Path.home() / ".cache/llamacpp-ref/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
)
LISTENING = re.compile(r"listening on (https?://\S*?:(\d+))")
# Measured with llama-tokenize on the default model's tokenizer: 1.15 tokens per word of the
# text below (the exact count is reported from `usage.prompt_tokens`).
TOKENS_PER_WORD = 1.15
STORY = (
    "The old lighthouse stood at the edge of the northern cliffs, its white paint worn grey by a "
    "century of salt and wind. Every evening the keeper climbed the spiral stairs, trimmed the "
    "wick, polished the great lens and watched the beam sweep across the dark water, counting the "
    "ships that passed and writing their names in a leather book. One winter night a storm rolled "
    "in from the sea, and the waves rose higher than he had ever seen them. Through the rain he "
    "noticed a small boat without lights drifting toward the rocks below the tower. He rang the "
    "bell, lit the emergency flares and ran down to the harbour, where the fishermen were already "
    "pulling on their coats. Together they rowed into the black water, guided only by the slow "
    "turning of the beam above them. When they reached the boat they found a young girl holding a "
    "lantern that had gone out, and a dog asleep at her feet. She told them she had sailed from "
    "the island to fetch medicine for her grandmother, and that the wind had broken her mast. The "
    "keeper wrapped her in his coat and promised that the light would always be there to bring "
    "her home."
)
TARGETS = {  # issue 4, for 16 streams x 128 tokens on the default model
    "aggregate_tok_s": (">=", 2.0),
    "ttft_p50_ms": ("<=", 0.5),
    "single_decode_tok_s": (">=", 1.3),
    "peak_rss_mb": ("<=", 1.1),
}


class BenchError(Exception):
    """A server could not be started or used."""


def log(message):
    print(f"[bench_http] {message}", file=sys.stderr, flush=True)


def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def make_prompt(index, prompt_tokens):
    words = STORY.split()
    # About 10 tokens go to the index (5 digits, one token each, so every prompt has the same
    # length) and the instruction.
    want = max(4, round(prompt_tokens / TOKENS_PER_WORD) - 9)
    while len(words) < want:
        words += STORY.split()
    return f"Request {index:05d}. " + " ".join(words[:want]) + " Continue the story:"


# --- machine state ----------------------------------------------------------------------------

def loadavg():
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot(pid):
    """(busy s, steal s) of the whole machine, the process's CPU s, this client's CPU s."""
    busy = steal = proc = None
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK
        steal = (f[7] if len(f) > 7 else 0) / TICK
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        proc = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return busy, steal, proc, t.user + t.system


def other_cpu_cores(before, after, elapsed):
    """Cores used by everything but the server and this client between two snapshots."""
    if None in before or None in after or elapsed <= 0:
        return None
    mine = (after[2] - before[2]) + (after[3] - before[3])
    return max(0.0, (after[0] - before[0]) - mine) / elapsed


def wait_quiet(pid, max_wait, threshold, window, what):
    """Waits (at most max_wait s) for a `window`-second stretch in which other processes use
    less than `threshold` cores. Returns the last stretch's value."""
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        before, t0 = cpu_snapshot(pid), time.monotonic()
        time.sleep(window)
        other = other_cpu_cores(before, cpu_snapshot(pid), time.monotonic() - t0)
        if other is None or other < threshold:
            return other
        if time.monotonic() >= deadline:
            log(f"warning: the machine is still busy ({other:.2f} other cores) before {what}; "
                "measuring anyway, the numbers will be noisy")
            return other
        if not said:
            log(f"waiting for a quiet machine before {what} ({other:.2f} other cores busy; "
                f"at most {max_wait:.0f}s)")
            said = True


def proc_status_kb(pid, key):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- servers ----------------------------------------------------------------------------------

LIVE_SERVERS = []


def die_with_parent():
    """In the child before exec: SIGKILL it if this script dies without cleaning up (kill -9).
    Linux only; elsewhere the try/finally and atexit clean-up still apply."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    def __init__(self, name, label, argv, log_dir, env=None):
        self.name, self.label, self.argv, self.env = name, label, argv, env
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc = None
        self.host = self.port = None

    def start(self, listen_timeout, ready_timeout):
        log(f"starting {self.label}: {shlex.join(self.argv)}")
        # Appended to, round after round; this start's lines begin at `offset`.
        self._log = open(self.log_path, "ab")
        offset = self._log.tell()
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=die_with_parent,
            )
        except OSError as e:
            raise BenchError(f"cannot start {self.label} ({self.argv[0]}): {e}") from e
        LIVE_SERVERS.append(self)
        started = time.monotonic()
        # llama-server prints its address once the model is loaded, ours before loading it:
        # wait for the line, then for /health, all within both limits.
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                m = LISTENING.search(f.read().decode(errors="replace"))
            if m:
                url = m.group(1)
                self.port = int(m.group(2))
                break
            self._check_alive("before listening")
            if time.monotonic() - started > listen_timeout + ready_timeout:
                raise BenchError(f"{self.label} logged no 'listening on' line within "
                                 f"{listen_timeout + ready_timeout:.0f}s{self.tail()}")
            time.sleep(0.1)
        self.host = "127.0.0.1"
        log(f"{self.label} listening on {url}; waiting for /health")
        while True:
            self._check_alive("while loading")
            status = self.health()
            if status == 200:
                break
            if time.monotonic() - started > ready_timeout:
                raise BenchError(f"{self.label}: /health not 200 within {ready_timeout:.0f}s "
                                 f"(last: {status}){self.tail()}")
            time.sleep(0.2)
        self.ready_s = time.monotonic() - started
        log(f"{self.label} ready in {self.ready_s:.1f}s (pid {self.proc.pid})")

    def health(self):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except OSError:
            return 0
        finally:
            conn.close()

    def _check_alive(self, when):
        if self.proc.poll() is not None:
            raise BenchError(f"{self.label} exited {when} (status {self.proc.returncode})"
                             f"{self.tail()}")

    def tail(self, lines=25):
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(text)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{self.label} ignored SIGTERM for 15s; killing it")
                self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log(f"{self.label} (pid {self.proc.pid}) did not die")
        if self in LIVE_SERVERS:
            LIVE_SERVERS.remove(self)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None


def stop_all_servers():
    for server in list(LIVE_SERVERS):
        try:
            server.stop()
        except Exception as e:  # never leave a server behind because another one failed
            log(f"stopping {server.label}: {e}")


# --- the client -------------------------------------------------------------------------------

def stream_request(host, port, body, timeout, start_gate=None):
    """Sends one streaming completion and reads it to the end. Returns a record of times
    (seconds, this client's perf_counter) and counts; `error` is set when it did not end well."""
    rec = {"send": None, "chunks": [], "end": None, "usage": None, "finish_reason": None,
           "error": None}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    try:
        try:
            conn.connect()
        except OSError:
            if start_gate is not None:
                start_gate.abort()  # the others fail at once instead of waiting for this one
            raise
        if start_gate is not None:
            start_gate.wait(timeout)
        rec["send"] = time.perf_counter()
        conn.request("POST", "/v1/completions", body=payload, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read(2000).decode(errors="replace")
            rec["error"] = f"HTTP {resp.status}: {text}"
            return rec
        done = False
        while not done:
            line = resp.readline()
            now = time.perf_counter()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (keep-alives), other fields
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                rec["error"] = f"error event: {json.dumps(event['error'])[:500]}"
                break
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    rec["chunks"].append(now)
                if choice.get("finish_reason"):
                    rec["finish_reason"] = choice["finish_reason"]
            if event.get("usage"):
                rec["usage"] = event["usage"]
        rec["end"] = time.perf_counter()
        if not done and rec["error"] is None:
            rec["error"] = "the stream ended without [DONE]"
    except (OSError, http.client.HTTPException, ValueError, threading.BrokenBarrierError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return rec


def request_body(server_name, index, args):
    body = {
        "prompt": make_prompt(index, args.prompt_tokens),
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0,
    }
    if server_name == "llama":
        body["cache_prompt"] = False
    return body


def run_scenario(server, name, n, first_index, args, max_tokens=None):
    """n requests sent at once (released together by a barrier). Returns per-request records."""
    records = [None] * n
    gate = threading.Barrier(n) if n > 1 else None

    def worker(i):
        body = request_body(server.name, first_index + i, args)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        records[i] = stream_request(server.host, server.port, body, args.timeout, gate)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.scenario_timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise BenchError(f"{server.label}, {name}: requests still running after "
                             f"{args.scenario_timeout:.0f}s")
    if server.proc.poll() is not None:
        raise BenchError(f"{server.label} died during {name}{server.tail()}")
    return records


def finish_record(rec):
    """Adds the derived numbers to a record (and makes its times relative to its send)."""
    chunks = rec["chunks"]
    usage_tokens = (rec["usage"] or {}).get("completion_tokens")
    rec["content_chunks"] = len(chunks)
    rec["tokens"] = usage_tokens if usage_tokens is not None else len(chunks)
    rec["prompt_tokens"] = (rec["usage"] or {}).get("prompt_tokens")
    rec["ttft_s"] = chunks[0] - rec["send"] if chunks else None
    rec["itl_s"] = [b - a for a, b in zip(chunks, chunks[1:])]
    span = chunks[-1] - chunks[0] if len(chunks) > 1 else 0.0
    rec["decode_tok_s"] = (rec["tokens"] - 1) / span if span > 0 else None
    return rec


def summarize(records, expected_tokens):
    ok = [r for r in records if r["error"] is None]
    bad = [r for r in records if r["error"] is not None]
    short = [r for r in ok if r["tokens"] != expected_tokens]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    itl = [x for r in ok for x in r["itl_s"]]
    decode = [r["decode_tok_s"] for r in ok if r["decode_tok_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    sends = [r["send"] for r in records if r["send"] is not None]
    ends = [r["end"] for r in ok if r["end"] is not None]
    wall = (max(ends) - min(sends)) if sends and ends else None
    ms = lambda v: None if v is None else v * 1000.0  # noqa: E731
    return {
        "requests": len(records),
        "failed": len(bad),
        "errors": [r["error"] for r in bad][:5],
        "wrong_token_count": len(short),
        "tokens": tokens,
        "content_chunks": sum(r["content_chunks"] for r in ok),
        "prompt_tokens": sorted({r["prompt_tokens"] for r in ok if r["prompt_tokens"]}),
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall if wall else None,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p95_ms": ms(percentile(ttft, 95)),
        "itl_p50_ms": ms(percentile(itl, 50)),
        "itl_p95_ms": ms(percentile(itl, 95)),
        "decode_tok_s_p50": percentile(decode, 50),
        "decode_tok_s_min": min(decode) if decode else None,
    }


def bench_server(server, args):
    """Starts the server, runs the warm-up and both scenarios, stops it. Returns its results."""
    result = {"label": server.label, "command": shlex.join(server.argv)}
    result["load_before"] = loadavg()
    server.start(args.listen_timeout, args.ready_timeout)
    try:
        result["ready_s"] = server.ready_s
        result["rss_ready_kb"] = proc_status_kb(server.proc.pid, "VmRSS")
        pid = server.proc.pid
        if not args.no_warmup:
            warm = finish_record(run_scenario(server, "warm-up", 1, 99_999, args,
                                              max_tokens=min(16, args.max_tokens))[0])
            if warm["error"]:
                raise BenchError(f"{server.label}: the warm-up request failed: {warm['error']}")
        scenarios = {}
        plan = [("concurrent", [(args.streams, 0)]),
                ("single", [(1, 10_000 + k) for k in range(args.single_runs)])]
        for name, runs in plan:
            kept = None
            for attempt in range(1 + args.retries):
                if args.wait_quiet > 0:
                    wait_quiet(pid, args.wait_quiet, args.quiet_threshold, args.quiet_window,
                               f"{server.label}, {name}")
                log(f"{server.label}: {name}: {len(runs)} x {runs[0][0]} stream(s) x "
                    f"{args.max_tokens} tokens" + (f" (attempt {attempt + 1})" if attempt else ""))
                before, t0 = cpu_snapshot(pid), time.monotonic()
                recs = []
                for n, first_index in runs:
                    # A new index per attempt: no request repeats an earlier prompt.
                    index = first_index + 20_000 * attempt
                    recs += [finish_record(r) for r in run_scenario(server, name, n, index, args)]
                after, elapsed = cpu_snapshot(pid), time.monotonic() - t0
                summary = summarize(recs, args.max_tokens)
                summary["other_cpu_cores"] = other = other_cpu_cores(before, after, elapsed)
                summary["steal_cores"] = (after[1] - before[1]) / elapsed if None not in (
                    before[1], after[1]) else None
                summary["server_cpu_cores"] = (after[2] - before[2]) / elapsed if None not in (
                    before[2], after[2]) else None
                summary["attempt"] = attempt + 1
                # Keep the quietest attempt; stop at the first quiet one.
                kept_other = None if kept is None else kept["summary"]["other_cpu_cores"]
                if kept is None or (other is not None and (kept_other is None or other < kept_other)):
                    kept = {"summary": summary, "records": recs}
                if other is None or other <= args.quiet_threshold:
                    break
                if attempt < args.retries:
                    log(f"{server.label}, {name}: other processes used {other:.2f} cores; "
                        "measuring again")
            scenarios[name] = kept
        result["scenarios"] = scenarios
        result["peak_rss_kb"] = proc_status_kb(server.proc.pid, "VmHWM")
        result["rss_end_kb"] = proc_status_kb(server.proc.pid, "VmRSS")
    finally:
        server.stop()
    result["load_after"] = loadavg()
    # Relative times keep the JSON readable; absolute perf_counter values mean nothing.
    # Per record: `send` from the scenario's first send, `chunks` and `end` from its own send.
    for sc in result.get("scenarios", {}).values():
        sends = [r["send"] for r in sc["records"] if r["send"] is not None]
        start = min(sends) if sends else 0.0
        for r in sc["records"]:
            base = r["send"]
            r["chunks"] = [round(t - base, 6) for t in r["chunks"]] if base is not None else []
            r["end"] = None if (r["end"] is None or base is None) else round(r["end"] - base, 6)
            r["send"] = None if base is None else round(base - start, 6)
            r["itl_s"] = [round(x, 6) for x in r["itl_s"]]
    return result


# --- set-up -----------------------------------------------------------------------------------

def default_model():
    script = REPO / "scripts" / "fetch-default-model.sh"
    try:
        out = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE,
                             timeout=900, text=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BenchError(f"cannot get the default model with {script}: {e}") from e
    lines = [l.strip() for l in out.splitlines() if l.strip()]
    if not lines:
        raise BenchError(f"{script} printed no path")
    return lines[-1]


def ours_binary(args):
    if args.ours_bin:
        path = Path(args.ours_bin)
        if not os.access(path, os.X_OK):
            raise BenchError(f"--ours-bin {path} is not an executable file")
        return path
    path = DEFAULT_OURS_BIN
    if args.build or not path.exists():
        cmd = ["cargo", "build", "--release", "--bin", "llm-worker-rbee-cpu"]
        log(f"building our binary: {shlex.join(cmd)}")
        try:
            subprocess.run(cmd, cwd=REPO, check=True, timeout=3600, stdout=sys.stderr)
        except (OSError, subprocess.SubprocessError) as e:
            raise BenchError(f"cannot build {path}: {e}") from e
    if not path.exists():
        raise BenchError(f"{path} is missing after the build")
    newest = max((p.stat().st_mtime for p in (REPO / "src").rglob("*.rs")), default=0)
    if newest > path.stat().st_mtime:
        log(f"warning: {path} is older than src/ (pass --build to rebuild it first)")
    return path


def llama_server_binary(args):
    if args.llama_server:
        path = Path(args.llama_server)
        if not os.access(path, os.X_OK):
            raise BenchError(f"--llama-server {path} is not an executable file")
        return path
    if os.access(DEFAULT_LLAMA_SERVER, os.X_OK):
        return DEFAULT_LLAMA_SERVER
    for script in LLAMACPP_BUILD_SCRIPTS:
        if script.exists():
            log(f"llama-server not built yet; running {script} (about 20 minutes cold)")
            try:
                out = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE,
                                     timeout=7200, text=True).stdout
            except (OSError, subprocess.SubprocessError) as e:
                raise BenchError(f"{script} failed: {e}") from e
            path = Path(out.strip().splitlines()[-1]) / "llama-server"
            if os.access(path, os.X_OK):
                return path
            raise BenchError(f"{script} built no {path}")
    raise BenchError("no llama-server: pass --llama-server or run "
                     "../shared/tools/build-llamacpp-reference.sh")


def version_of(argv):
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=30, text=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    for line in out.splitlines():
        if "version" in line.lower() or line.startswith("llm-worker-rbee"):
            return line.strip()
    return out.strip().splitlines()[0] if out.strip() else "?"


def git_state():
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src",
                                "Cargo.toml", "Cargo.lock"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, timeout=10).stdout.strip()
        return f"{rev}{' + uncommitted changes in src/' if dirty else ''}" if rev else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def clean_env():
    """This environment without the worker's own settings, so only the flags count."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LLM_WORKER_") and k not in
           ("LLORCH_API_TOKEN", "RAYON_NUM_THREADS", "CANDLE_NUM_THREADS", "OMP_NUM_THREADS")}
    env["NO_COLOR"] = "1"
    return env


# --- report -----------------------------------------------------------------------------------

def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def metric(res, scenario, key):
    """One round's value; peak RSS in MiB."""
    if scenario is None:
        v = res.get(key)
        return None if v is None else v / 1024.0
    return res["scenarios"][scenario]["summary"].get(key)


def report(results, args, commands, meta):
    """`results`: server name -> list of rounds. With several rounds every cell is the median
    over the rounds, and the ratio is the ratio of the medians."""
    ours, llama = results.get("ours"), results.get("llama")
    n, m = args.streams, args.max_tokens

    def get(rounds, scenario, key):
        values = [v for v in (metric(r, scenario, key) for r in rounds or []) if v is not None]
        return statistics.median(values) if values else None

    rows = [
        (f"{n} streams: aggregate generated tok/s", "concurrent", "aggregate_tok_s", "aggregate_tok_s", 1),
        (f"{n} streams: TTFT p50 (ms)", "concurrent", "ttft_p50_ms", "ttft_p50_ms", 0),
        (f"{n} streams: TTFT p95 (ms)", "concurrent", "ttft_p95_ms", None, 0),
        (f"{n} streams: ITL p50 (ms)", "concurrent", "itl_p50_ms", None, 1),
        (f"{n} streams: ITL p95 (ms)", "concurrent", "itl_p95_ms", None, 1),
        (f"{n} streams: per-request decode tok/s, median", "concurrent", "decode_tok_s_p50", None, 1),
        ("1 stream: decode tok/s (median of runs)", "single", "decode_tok_s_p50", "single_decode_tok_s", 1),
        ("1 stream: TTFT p50 (ms)", "single", "ttft_p50_ms", None, 0),
        ("1 stream: ITL p50 (ms)", "single", "itl_p50_ms", None, 1),
        ("1 stream: ITL p95 (ms)", "single", "itl_p95_ms", None, 1),
        ("peak RSS (MiB, VmHWM)", None, "peak_rss_kb", "peak_rss_mb", 1),
    ]
    default_shape = n == 16 and m == 128
    out = []
    p = out.append
    p(f"### HTTP load: `/v1/completions`, {n} streams and 1 stream, {m} tokens each")
    p("")
    p(f"- date: {meta['date']}; machine: {meta['cpu']}, {os.cpu_count()} CPUs; "
      f"load average before: {meta['load_before']}")
    p(f"- model: `{meta['model']}`; threads: {args.threads}; ours: {meta['ours_version']} "
      f"(git {meta['git']}); llama.cpp: {meta['llama_version']}")
    if args.rounds > 1:
        p(f"- {args.rounds} rounds (each server started afresh in each, one at a time); each "
          "cell is the median over the rounds, each ratio the ratio of the medians")
    for rounds in (ours, llama):
        for k, res in enumerate(rounds or []):
            s = res["scenarios"]["concurrent"]["summary"]
            s1 = res["scenarios"]["single"]["summary"]
            which = f", round {k + 1}" if len(rounds) > 1 else ""
            p(f"- {res['label']}{which}: prompt tokens {s['prompt_tokens']}, "
              f"{s['tokens']} tokens in {s['content_chunks']} content chunks ({n} streams); "
              f"aggregate {fmt(s['aggregate_tok_s'])} tok/s, 1-stream decode "
              f"{fmt(s1['decode_tok_s_p50'])} tok/s; other processes' CPU while measured: "
              f"{fmt(s['other_cpu_cores'], 2)} cores ({n} streams), "
              f"{fmt(s1['other_cpu_cores'], 2)} (1 stream); load average after: {res['load_after']}")
    p("")
    p("| measure | ours | llama.cpp | ours/llama.cpp | target |")
    p("|---|---:|---:|---:|---|")
    for title, scenario, key, target_key, digits in rows:
        a, b = get(ours, scenario, key), get(llama, scenario, key)
        r = ratio(a, b)
        target = ""
        if target_key and default_shape:
            op, bound = TARGETS[target_key]
            met = None if r is None else (r >= bound if op == ">=" else r <= bound)
            target = f"{'≥' if op == '>=' else '≤'} {bound}×" + (
                "" if met is None else (" met" if met else " not met"))
        p(f"| {title} | {fmt(a, digits)} | {fmt(b, digits)} | {fmt(r, 2)} | {target} |")
    p("")
    p("Commands:")
    p("")
    p("```")
    for c in commands:
        p(c)
    p("```")
    p("")
    p("TTFT: request sent → first content chunk. ITL: gaps between content chunks, pooled. "
      "Decode tok/s: (tokens − 1) / (last − first content chunk) per request. Aggregate: all "
      "tokens / (last end − first send). Tokens from `usage.completion_tokens`. Percentiles "
      "interpolate linearly. Ratios below 1 are better for TTFT, ITL and RSS.")
    return "\n".join(out)


# --- main -------------------------------------------------------------------------------------

def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    ap.add_argument("--model", help="GGUF to serve (default: scripts/fetch-default-model.sh's)")
    ap.add_argument("--streams", type=int, default=16, help="concurrent requests (default 16)")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of both servers (default 2)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="approximate prompt length (default 64)")
    ap.add_argument("--single-runs", type=int, default=3, help="single-stream requests, one after another (default 3)")
    ap.add_argument("--only", choices=["ours", "llama"], help="benchmark one server only")
    ap.add_argument("--ours-bin", help=f"our binary (default: {DEFAULT_OURS_BIN.relative_to(REPO)}, built if missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release for the default binary first")
    ap.add_argument("--llama-server", help="llama-server binary (default: the reference build's)")
    ap.add_argument("--parallel", type=int, help="our --parallel (default: --streams)")
    ap.add_argument("--llama-parallel", type=int, help="llama-server -np (default: --streams)")
    ap.add_argument("--ctx-size", type=int, default=8192, help="llama-server -c, shared by its slots (default 8192)")
    ap.add_argument("--ours-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for our worker (repeatable, e.g. --ours-arg=--batch-size=256)")
    ap.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for llama-server (repeatable)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run everything this many times, servers alternating, and report "
                         "medians (default 1)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up request")
    ap.add_argument("--json", metavar="OUT", help="write every number (per request too) to OUT")
    ap.add_argument("--log-dir", help="keep the servers' logs here (default: a temporary folder)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one socket read may take (default 300)")
    ap.add_argument("--scenario-timeout", type=float, default=1200.0, help="seconds one scenario may take (default 1200)")
    ap.add_argument("--listen-timeout", type=float, default=60.0, help="seconds until a server logs its port (default 60)")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds until /health is 200 (default 300)")
    ap.add_argument("--wait-quiet", type=float, default=300.0, metavar="S",
                    help="before each scenario, wait up to S seconds for other processes to use "
                         "less than --quiet-threshold cores (0: do not wait; default 300)")
    ap.add_argument("--quiet-threshold", type=float, default=0.2, metavar="CORES",
                    help="other processes' CPU above which a measurement counts as noisy "
                         "(default 0.2)")
    ap.add_argument("--quiet-window", type=float, default=5.0, metavar="S",
                    help="how long the machine must stay quiet before a scenario (default 5)")
    ap.add_argument("--retries", type=int, default=2,
                    help="measure a noisy scenario again up to this many times, keeping the "
                         "quietest attempt (default 2)")
    ap.add_argument("--cooldown", type=float, default=3.0, help="seconds of rest between the servers (default 3)")
    args = ap.parse_args()
    for name in ("streams", "threads", "max_tokens", "prompt_tokens", "single_runs", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.retries < 0:
        ap.error("--retries must not be negative")
    return args


def main():
    args = parse_args()
    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so the finally blocks stop the servers.
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    atexit.register(stop_all_servers)

    tmp = None
    try:
        if args.log_dir:
            log_dir = Path(args.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="bench_http.")
            log_dir = Path(tmp.name)
        model = args.model or default_model()
        if not Path(model).is_file():
            raise BenchError(f"model {model} not found")
        parallel = args.parallel or args.streams
        llama_np = args.llama_parallel or args.streams
        per_slot = args.ctx_size // llama_np
        if args.only != "ours" and args.prompt_tokens + args.max_tokens + 16 > per_slot:
            log(f"warning: llama-server gives each of its {llama_np} slots {per_slot} positions "
                f"(-c {args.ctx_size}); prompt + max_tokens may not fit")

        servers = []
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_model(),
                "load_before": loadavg(), "model": model, "git": git_state(),
                "ours_version": "–", "llama_version": "–"}
        if args.only != "llama":
            ours_bin = ours_binary(args)
            meta["ours_version"] = version_of([str(ours_bin), "--version"])
            servers.append(Server("ours", "ours", [
                str(ours_bin), "--model", model, "--host", "127.0.0.1", "--port", "0",
                "--parallel", str(parallel), "--threads", str(args.threads), *args.ours_arg,
            ], log_dir, env=clean_env()))
        if args.only != "ours":
            llama_bin = llama_server_binary(args)
            meta["llama_version"] = version_of([str(llama_bin), "--version"])
            servers.append(Server("llama", "llama.cpp", [
                str(llama_bin), "-m", model, "--host", "127.0.0.1", "--port", "0",
                "-t", str(args.threads), "-np", str(llama_np), "-c", str(args.ctx_size),
                "--cont-batching", *args.llama_arg,
            ], log_dir))
        load = meta["load_before"]
        if load and load[0] > 1.5:
            log(f"warning: load average {load} before the run: the machine is busy, the numbers "
                "will be noisy")

        results = {server.name: [] for server in servers}
        for round_index in range(args.rounds):
            if args.rounds > 1:
                log(f"round {round_index + 1} of {args.rounds}")
            for k, server in enumerate(servers):
                if k or round_index:
                    time.sleep(args.cooldown)
                res = bench_server(server, args)
                results[server.name].append(res)
                s = res["scenarios"]
                log(f"{server.label}: aggregate {fmt(s['concurrent']['summary']['aggregate_tok_s'])} tok/s, "
                    f"single decode {fmt(s['single']['summary']['decode_tok_s_p50'])} tok/s, "
                    f"peak RSS {fmt((res['peak_rss_kb'] or 0) / 1024)} MiB")

        commands = [shlex.join([sys.executable, *sys.argv])] + [shlex.join(s.argv) for s in servers]
        print(report(results, args, commands, meta))

        failed = 0
        for res in (r for rounds in results.values() for r in rounds):
            for name, sc in res["scenarios"].items():
                s = sc["summary"]
                if s["failed"] or s["wrong_token_count"]:
                    failed += 1
                    log(f"{res['label']}, {name}: {s['failed']} request(s) failed, "
                        f"{s['wrong_token_count']} ended with a token count other than "
                        f"{args.max_tokens}; first errors: {s['errors']}")
                other = s.get("other_cpu_cores")
                if other is not None and other > args.quiet_threshold:
                    log(f"warning: other processes used {other:.2f} cores while {res['label']}, "
                        f"{name}, was measured: its numbers are noisy")
        if args.json:
            doc = {"args": vars(args), "meta": meta, "commands": commands, "results": results}
            Path(args.json).write_text(json.dumps(doc, indent=1))
            log(f"raw numbers written to {args.json}")
        return 1 if failed else 0
    except BenchError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); stopping the servers")
        return 130
    finally:
        stop_all_servers()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
