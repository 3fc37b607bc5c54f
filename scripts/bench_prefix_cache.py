#!/usr/bin/env python3
"""Prefix-cache benchmark: multi-turn chat on our worker and on llama.cpp's llama-server.

Starts each server in turn (never both at once, a fresh process per scenario), holds chat
conversations through streaming `POST /v1/chat/completions` and prints a markdown table of both
servers and the ours/llama.cpp ratios, with the exact commands, ready to paste into
BENCHMARKS.md. Server start and stop, the quiet-machine wait and the /proc CPU check are
scripts/bench_http.py's (imported from it).

    python3 scripts/bench_prefix_cache.py                        # both scenarios, both servers
    python3 scripts/bench_prefix_cache.py --only ours --conversations 4 --json /tmp/pc.json

Scenarios, each against each server, after one warm-up request (`cache_prompt: false`,
excluded):
  multi-turn   one conversation of --turns turns (default 5), --rounds times (default 3; a
               new conversation, with new text, each round). Every user turn adds about
               --turn-tokens tokens (default 280) of deterministic filler text distinct per
               conversation and turn, asking for a one-sentence answer (--ask short) or a
               retelling that runs to --max-tokens (--ask detail: a chat whose replies are as
               long as its questions); the assistant's reply is appended to the history exactly
               as the server streamed it. After the last turn the same last-turn request is
               sent again with `"cache_prompt": false` (the uncached baseline) and once more
               cached (the whole prompt is in the cache by then).
  concurrent   --conversations conversations (default 16) at once, one thread each, their turns
               sequential within a conversation; the first turns leave together (a barrier).
Every request: `"stream": true, "stream_options": {"include_usage": true}, "temperature": 0,
"max_tokens": --max-tokens` (default 32); no system message (the model's chat template adds its
default one).

Servers (both given --threads compute threads):
  ours       --parallel P --ctx-size 2048 (per sequence), no LLORCH_API_TOKEN in the environment;
             prefix cache budget --cache-ram at its default unless --ours-arg sets it.
  llama.cpp  -np P -c 32768 (split among the slots: 2048 each) --cont-batching --cache-prompt
             --cache-reuse 256. Per-slot prompt caching (`--cache-prompt`) is on by default;
             `--cache-reuse` lets a slot also reuse chunks after the first mismatch by shifting
             its KV; --slot-prompt-similarity (default 0.10) sends a conversation back to the slot
             that holds its history; --cache-ram (default 8192 MiB) keeps idle slots' prompts.
  P is --conversations (default 16) for both.

Definitions (this client's monotonic clock; percentiles interpolate linearly between the
closest ranks, as numpy's default):
  TTFT           from just before the request is written to the arrival of the first SSE chunk
                 whose choices[0].delta.content is not empty (includes queueing for a slot and
                 the prefill of whatever the cache did not hold).
  prompt tokens  usage.prompt_tokens; completion tokens usage.completion_tokens.
  cached tokens  usage.prompt_tokens_details.cached_tokens (ours; llama-server's when it sends
                 it, else its timings.cache_n).
  expected reuse for turn t >= 2: prompt_tokens(t-1) + completion_tokens(t-1) - 1, the tokens
                 whose keys and values the previous turn computed (its last sampled token is
                 never fed). A turn may reuse fewer: when the reply, appended as text and
                 tokenized again inside the template, does not give back the tokens the model
                 generated (a reply cut at max_tokens, or a word split differently), the shared
                 prefix ends at the first differing token and the rest is prefilled again.
                 It can never reuse more than prompt_tokens(t) - 1 (one token is always read to
                 get the first logits). A mismatch is reported, not an error.
  other CPU      the CPU time this machine spent outside the server and this client while a
                 scenario ran, in cores (from /proc/stat); above --quiet-threshold the numbers
                 are noisy, and the scenario is measured again (--retries, new conversations),
                 the quietest attempt kept.

Exit status: 0 when every request ended normally, 1 when one did not, 2 when a server could not
be started or used.
"""

import argparse
import atexit
import http.client
import json
import os
import random
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_http as bh  # noqa: E402  (server start/stop, quiet wait, /proc CPU, percentiles)

REPO = bh.REPO


def log(message):
    print(f"[bench_prefix_cache] {message}", file=sys.stderr, flush=True)


bh.log = log  # bench_http's Server and wait_quiet log through this name

# --- the conversations ------------------------------------------------------------------------

# Sentences of these parts average 10.7 tokens in the default model's tokenizer (measured with
# llama-tokenize); the exact counts come back in usage.prompt_tokens.
TOKENS_PER_SENTENCE = 10.7
SUBJECTS = ["The engineer", "A farmer", "The committee", "My neighbour", "The old captain",
            "A student", "The baker", "Our teacher", "The mayor", "A young nurse", "The gardener",
            "The pilot", "A tired driver", "The librarian", "The carpenter", "A curious child"]
VERBS = ["repaired", "described", "measured", "painted", "carried", "photographed", "studied",
         "cleaned", "sold", "borrowed", "ordered", "inspected", "forgot", "discovered", "moved",
         "counted"]
OBJECTS = ["the wooden bridge", "a broken clock", "three blue boxes", "the village map",
           "an old radio", "the heavy table", "a basket of apples", "the station roof",
           "two silver keys", "the long fence", "a stack of letters", "the small boat",
           "the garden gate", "a pair of boots", "the kitchen window", "a bag of flour"]
PLACES = ["near the river", "before dawn", "after the market closed", "in the north field",
          "during the storm", "behind the school", "on a quiet Sunday", "at the harbour",
          "under the bright lamps", "beside the railway", "in early spring", "after lunch",
          "on the hill road", "inside the museum", "by the lake", "late at night"]


ASKS = {
    # A one-line reply: most of each turn is the user's new text.
    "short": "Answer in one short sentence: what happened in part {turn}?",
    # A reply as long as max_tokens allows: each turn is half question, half answer, as chats go.
    "detail": "Retell part {turn} in detail, one sentence for each note.",
}


def user_turn(conversation, turn, turn_tokens, ask="short"):
    """The user's message of one turn: deterministic, distinct per (conversation, turn)."""
    rng = random.Random(conversation * 1000 + turn)
    # About 20 tokens go to the frame around the filler and the chat template's turn markers.
    sentences = max(1, round((turn_tokens - 20) / TOKENS_PER_SENTENCE))
    filler = " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                      f"{rng.choice(PLACES)}." for _ in range(sentences))
    return f"Notes {conversation:05d}, part {turn}: {filler} " + ASKS[ask].format(turn=turn)


# --- the client -------------------------------------------------------------------------------

def chat_request(host, port, messages, args, cache_prompt=None, gate=None):
    """Sends one streaming chat completion and reads it to the end. Returns a record: TTFT (s),
    the reply text, usage, cached tokens and `error` when it did not end well."""
    rec = {"ttft_s": None, "total_s": None, "reply": "", "usage": None, "timings": None,
           "finish_reason": None, "error": None}
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0, "max_tokens": args.max_tokens}
    if cache_prompt is not None:
        body["cache_prompt"] = cache_prompt
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
    try:
        try:
            conn.connect()
        except OSError:
            if gate is not None:
                gate.abort()
            raise
        if gate is not None:
            gate.wait(args.timeout)
        send = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=payload, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {resp.read(2000).decode(errors='replace')}"
            return rec
        done = False
        parts = []
        while True:
            line = resp.readline()
            now = time.perf_counter()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                rec["error"] = f"error event: {json.dumps(event['error'])[:500]}"
                break
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = now - send
                    parts.append(text)
                if choice.get("finish_reason"):
                    rec["finish_reason"] = choice["finish_reason"]
            if event.get("usage"):
                rec["usage"] = event["usage"]
            if event.get("timings"):
                rec["timings"] = event["timings"]
        rec["total_s"] = time.perf_counter() - send
        rec["reply"] = "".join(parts)
        if not done and rec["error"] is None:
            rec["error"] = "the stream ended without [DONE]"
        elif rec["usage"] is None and rec["error"] is None:
            rec["error"] = "no usage chunk"
    except (OSError, http.client.HTTPException, ValueError, threading.BrokenBarrierError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    usage = rec["usage"] or {}
    rec["prompt_tokens"] = usage.get("prompt_tokens")
    rec["completion_tokens"] = usage.get("completion_tokens")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None and rec["timings"]:
        cached = rec["timings"].get("cache_n")
    rec["cached_tokens"] = cached
    return rec


def converse(server, conversation, args, gate=None):
    """Holds one conversation of args.turns turns. Returns its records and the messages its
    last turn sent."""
    messages, records, sent = [], [], []
    for turn in range(1, args.turns + 1):
        messages.append({"role": "user", "content": user_turn(conversation, turn, args.turn_tokens, args.ask)})
        sent = list(messages)
        rec = chat_request(server.host, server.port, sent, args,
                           gate=gate if turn == 1 else None)
        rec["conversation"], rec["turn"] = conversation, turn
        if records and None not in (records[-1]["prompt_tokens"], records[-1]["completion_tokens"]):
            prev = records[-1]
            rec["expected_cached"] = min(prev["prompt_tokens"] + prev["completion_tokens"] - 1,
                                         (rec["prompt_tokens"] or 1) - 1)
        else:
            rec["expected_cached"] = None
        records.append(rec)
        if rec["error"]:
            break
        messages.append({"role": "assistant", "content": rec["reply"]})
    return records, sent


def measured(server, name, args, run):
    """Runs `run(attempt)` after waiting for a quiet machine, again while other processes were
    busy (at most args.retries more times); keeps the quietest attempt."""
    pid = server.proc.pid
    kept = None
    for attempt in range(1 + args.retries):
        if args.wait_quiet > 0:
            bh.wait_quiet(pid, args.wait_quiet, args.quiet_threshold, args.quiet_window,
                          f"{server.label}, {name}")
        log(f"{server.label}: {name}" + (f" (attempt {attempt + 1})" if attempt else ""))
        before, t0 = bh.cpu_snapshot(pid), time.monotonic()
        result = run(attempt)
        after, elapsed = bh.cpu_snapshot(pid), time.monotonic() - t0
        other = bh.other_cpu_cores(before, after, elapsed)
        result["other_cpu_cores"], result["wall_s"], result["attempt"] = other, elapsed, attempt + 1
        result["server_cpu_cores"] = (None if None in (before[2], after[2])
                                      else (after[2] - before[2]) / elapsed)
        if server.proc.poll() is not None:
            raise bh.BenchError(f"{server.label} died during {name}{server.tail()}")
        if kept is None or (other is not None and (kept["other_cpu_cores"] is None
                                                    or other < kept["other_cpu_cores"])):
            kept = result
        if other is None or other <= args.quiet_threshold:
            break
        if attempt < args.retries:
            log(f"{server.label}, {name}: other processes used {other:.2f} cores; measuring again")
    return kept


def warm_up(server, args):
    rec = chat_request(server.host, server.port,
                       [{"role": "user", "content": "Say hello."}], args, cache_prompt=False)
    if rec["error"]:
        raise bh.BenchError(f"{server.label}: the warm-up request failed: {rec['error']}")


def multi_turn(server, args):
    def run(attempt):
        rounds = []
        for k in range(args.rounds):
            conversation = 90_000 + 100 * attempt + k
            records, messages = converse(server, conversation, args)
            extra = {}
            if not records[-1]["error"]:
                extra["uncached"] = chat_request(server.host, server.port, messages, args,
                                                 cache_prompt=False)
                extra["recached"] = chat_request(server.host, server.port, messages, args)
            rounds.append({"conversation": conversation, "turns": records, **extra})
        return {"rounds": rounds}
    return measured(server, "multi-turn", args, run)


def concurrent(server, args):
    n = args.conversations

    def run(attempt):
        out = [None] * n
        gate = threading.Barrier(n) if n > 1 else None

        def worker(i):
            try:
                out[i] = converse(server, 1000 * (attempt + 1) + i, args, gate)[0]
            except Exception as e:  # a thread's failure is a failed record, not a hang
                out[i] = [{"error": f"{type(e).__name__}: {e}", "turn": 1, "ttft_s": None}]

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + args.scenario_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise bh.BenchError(f"{server.label}, concurrent: conversations still running "
                                    f"after {args.scenario_timeout:.0f}s")
        return {"conversations": out, "elapsed_s": time.perf_counter() - t0}
    return measured(server, "concurrent", args, run)


def bench_server(server, scenario, args):
    """A fresh server for one scenario: start, warm up, measure, stop."""
    server.start(args.listen_timeout, args.ready_timeout)
    try:
        warm_up(server, args)
        result = (multi_turn if scenario == "multi" else concurrent)(server, args)
        result["peak_rss_kb"] = bh.proc_status_kb(server.proc.pid, "VmHWM")
    finally:
        server.stop()
    result["load_after"] = bh.loadavg()
    return result


# --- numbers ----------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ms(v):
    return None if v is None else v * 1000.0


def multi_summary(res):
    rounds = res["rounds"]
    turns = max(len(r["turns"]) for r in rounds)
    per_turn = []
    for t in range(turns):
        recs = [r["turns"][t] for r in rounds if len(r["turns"]) > t]
        per_turn.append({
            "ttft_ms": ms(med([r["ttft_s"] for r in recs])),
            "prompt_tokens": [r["prompt_tokens"] for r in recs],
            "completion_tokens": [r["completion_tokens"] for r in recs],
            "cached_tokens": [r["cached_tokens"] for r in recs],
            "expected_cached": [r["expected_cached"] for r in recs],
            "finish": [r["finish_reason"] for r in recs],
        })
    last = ms(med([r["turns"][-1]["ttft_s"] for r in rounds]))
    uncached = ms(med([r.get("uncached", {}).get("ttft_s") for r in rounds]))
    recached = ms(med([r.get("recached", {}).get("ttft_s") for r in rounds]))
    return {"per_turn": per_turn, "last_ms": last, "uncached_ms": uncached,
            "recached_ms": recached,
            "uncached_cached_tokens": [r.get("uncached", {}).get("cached_tokens") for r in rounds],
            "recached_cached_tokens": [r.get("recached", {}).get("cached_tokens") for r in rounds]}


def concurrent_summary(res):
    recs = [r for conv in res["conversations"] for r in conv]
    later = [r["ttft_s"] for r in recs if r.get("turn", 0) >= 2 and r.get("ttft_s") is not None]
    first = [r["ttft_s"] for r in recs if r.get("turn") == 1 and r.get("ttft_s") is not None]
    reuse = [(r["cached_tokens"], r["expected_cached"], r["prompt_tokens"]) for r in recs
             if r.get("turn", 0) >= 2 and r.get("expected_cached") is not None]
    cached_share = [c / p for c, _, p in reuse if c is not None and p]
    tokens = sum((r.get("completion_tokens") or 0) for r in recs)
    return {
        "requests": len(recs),
        "failed": sum(1 for r in recs if r.get("error")),
        "errors": [r["error"] for r in recs if r.get("error")][:5],
        "ttft_later_p50_ms": ms(bh.percentile(later, 50)),
        "ttft_later_p95_ms": ms(bh.percentile(later, 95)),
        "ttft_later_n": len(later),
        "ttft_first_p50_ms": ms(bh.percentile(first, 50)),
        "ttft_first_p95_ms": ms(bh.percentile(first, 95)),
        "cached_share_median": med(cached_share),
        "reuse_short": sum(1 for c, e, _ in reuse if c is not None and c < e),
        "reuse_exact": sum(1 for c, e, _ in reuse if c == e),
        "reuse_n": len(reuse),
        "prompt_tokens_last": med([r.get("prompt_tokens") for r in recs
                                   if r.get("turn") == max(x.get("turn", 0) for x in recs)]),
        "completion_tokens": tokens,
        "elapsed_s": res["elapsed_s"],
    }


# --- report -----------------------------------------------------------------------------------

fmt, ratio = bh.fmt, bh.ratio


def verdict(value, bound):
    return "" if value is None else (" met" if value <= bound else " **not met**")


def report(results, args, commands, meta):
    out = []
    p = out.append
    n = args.conversations
    ms_ = {name: multi_summary(r["multi"]) for name, r in results.items() if "multi" in r}
    cs = {name: concurrent_summary(r["concurrent"]) for name, r in results.items()
          if "concurrent" in r}
    p(f"### Prefix cache: {args.turns}-turn chat, 1 conversation and {n} at once")
    p("")
    p(f"- date: {meta['date']}; machine: {meta['cpu']}, {os.cpu_count()} CPUs; "
      f"load average before: {meta['load_before']}")
    p(f"- model: `{meta['model']}`; threads: {args.threads}; ours: {meta['ours_version']} "
      f"(git {meta['git']}); llama.cpp: {meta['llama_version']}")
    p(f"- each user turn ~{args.turn_tokens} tokens of distinct text, asking for a {args.ask} "
      f"reply; replies at most "
      f"{args.max_tokens} tokens (temperature 0); multi-turn: median of {args.rounds} "
      f"conversations")
    for name, r in results.items():
        label = "ours" if name == "ours" else "llama.cpp"
        bits = []
        for sc in ("multi", "concurrent"):
            if sc in r:
                bits.append(f"{sc} {fmt(r[sc]['other_cpu_cores'], 2)} cores "
                            f"(attempt {r[sc]['attempt']})")
        p(f"- {label}: other processes' CPU while measured: {', '.join(bits)}")
    p("")
    p("| measure | ours | llama.cpp | ours/llama.cpp | target |")
    p("|---|---:|---:|---:|---|")
    o, l = ms_.get("ours"), ms_.get("llama")

    def row(title, a, b, digits=0, target=""):
        p(f"| {title} | {fmt(a, digits)} | {fmt(b, digits)} | {fmt(ratio(a, b), 2)} | {target} |")

    if o or l:
        turns = len((o or l)["per_turn"])
        for t in range(turns):
            a = o["per_turn"][t]["ttft_ms"] if o and len(o["per_turn"]) > t else None
            b = l["per_turn"][t]["ttft_ms"] if l and len(l["per_turn"]) > t else None
            row(f"1 conversation: TTFT turn {t + 1} (ms)", a, b)
        row(f"1 conversation: TTFT turn {turns} again, `cache_prompt: false` (ms)",
            o and o["uncached_ms"], l and l["uncached_ms"])
        row(f"1 conversation: TTFT turn {turns} again, cached (ms)",
            o and o["recached_ms"], l and l["recached_ms"])
        ra = o and ratio(o["last_ms"], o["uncached_ms"])
        rb = l and ratio(l["last_ms"], l["uncached_ms"])
        p(f"| **TTFT turn {turns} in the conversation / uncached** | **{fmt(ra, 2)}** | "
          f"{fmt(rb, 2)} | | ≤ 0.2{verdict(ra, 0.2)} |")
        ra = o and ratio(o["recached_ms"], o["uncached_ms"])
        rb = l and ratio(l["recached_ms"], l["uncached_ms"])
        p(f"| **TTFT turn {turns} sent again cached / uncached** | **{fmt(ra, 2)}** | "
          f"{fmt(rb, 2)} | | ≤ 0.2{verdict(ra, 0.2)} |")
    co, cl = cs.get("ours"), cs.get("llama")
    if co or cl:
        g = lambda s, k: s and s[k]  # noqa: E731
        r50 = ratio(g(co, "ttft_later_p50_ms"), g(cl, "ttft_later_p50_ms"))
        p(f"| **{n} conversations: TTFT p50, turns 2–{args.turns} (ms)** | "
          f"{fmt(g(co, 'ttft_later_p50_ms'), 0)} | {fmt(g(cl, 'ttft_later_p50_ms'), 0)} | "
          f"**{fmt(r50, 2)}** | ≤ 0.5×{verdict(r50, 0.5)} |")
        row(f"{n} conversations: TTFT p95, turns 2–{args.turns} (ms)",
            g(co, "ttft_later_p95_ms"), g(cl, "ttft_later_p95_ms"))
        row(f"{n} conversations: TTFT p50, turn 1 (ms)",
            g(co, "ttft_first_p50_ms"), g(cl, "ttft_first_p50_ms"))
        row(f"{n} conversations: TTFT p95, turn 1 (ms)",
            g(co, "ttft_first_p95_ms"), g(cl, "ttft_first_p95_ms"))
        row(f"{n} conversations: cached share of the prompt, turns 2–{args.turns}, median",
            g(co, "cached_share_median"), g(cl, "cached_share_median"), 2)
        row(f"{n} conversations: wall time, all {n * args.turns} turns (s)",
            g(co, "elapsed_s"), g(cl, "elapsed_s"), 1)
    p("")
    if o or l:
        p("Tokens per turn, 1 conversation (first round; expected reuse = previous turn's "
          "prompt + completion − 1; ⚠ marks a turn that reused another amount):")
        p("")
        p("| turn | ours prompt | ours completion | ours cached | ours expected "
          "| llama.cpp prompt | llama.cpp completion | llama.cpp cached | llama.cpp expected |")
        p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        first = lambda xs: xs[0] if xs else None  # noqa: E731

        def cells(summary, t):
            if not summary or len(summary["per_turn"]) <= t:
                return ["–"] * 4
            pt = summary["per_turn"][t]
            exp, got = first(pt["expected_cached"]), first(pt["cached_tokens"])
            flag = "" if got is None or exp is None or got == exp else " ⚠"
            return [fmt(first(pt["prompt_tokens"]), 0), fmt(first(pt["completion_tokens"]), 0),
                    fmt(got, 0) + flag, fmt(exp, 0)]
        for t in range(len((o or l)["per_turn"])):
            p(f"| {t + 1} | " + " | ".join(cells(o, t) + cells(l, t)) + " |")
        p("")
    for name, s in cs.items():
        label = "ours" if name == "ours" else "llama.cpp"
        p(f"- {label}, {n} conversations: {s['reuse_exact']} of {s['reuse_n']} later turns "
          f"reused exactly the expected prefix, {s['reuse_short']} fewer; {s['failed']} failed "
          f"requests; turn-{args.turns} prompt {fmt(s['prompt_tokens_last'], 0)} tokens (median)")
    p("")
    p("Commands:")
    p("")
    p("```")
    for c in commands:
        p(c)
    p("```")
    p("")
    p("TTFT: request sent → first chunk with non-empty `delta.content`. Cached tokens: "
      "`usage.prompt_tokens_details.cached_tokens` (llama-server: `timings.cache_n` where it "
      "does not send that). Percentiles interpolate linearly. Ratios below 1 are better.")
    return "\n".join(out)


def check_reuse(results):
    """Logs every later turn whose reused prefix differs from the expected one."""
    for name, r in results.items():
        recs = []
        if "multi" in r:
            recs += [t for rd in r["multi"]["rounds"] for t in rd["turns"]]
        if "concurrent" in r:
            recs += [t for conv in r["concurrent"]["conversations"] for t in conv]
        for rec in recs:
            exp, got = rec.get("expected_cached"), rec.get("cached_tokens")
            if exp is not None and got is not None and got != exp:
                log(f"{name}: conversation {rec['conversation']} turn {rec['turn']}: cached "
                    f"{got}, expected {exp} ({'fewer' if got < exp else 'more'}; prompt "
                    f"{rec['prompt_tokens']}): the reply, tokenized again as history, "
                    f"{'does not give back the generated tokens' if got < exp else 'shares more'}")


# --- main -------------------------------------------------------------------------------------

def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    ap.add_argument("--model", help="GGUF to serve (default: scripts/fetch-default-model.sh's)")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of both servers (default 2)")
    ap.add_argument("--turns", type=int, default=5, help="turns per conversation (default 5)")
    ap.add_argument("--turn-tokens", type=int, default=280, help="approximate tokens each user turn adds (default 280)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every reply (default 32)")
    ap.add_argument("--ask", choices=sorted(ASKS), default="short",
                    help="what each user turn asks for: a one-sentence answer (short, the default) "
                         "or a retelling as long as --max-tokens allows (detail)")
    ap.add_argument("--rounds", type=int, default=3, help="conversations of the multi-turn scenario, one after another (default 3)")
    ap.add_argument("--conversations", type=int, default=16, help="conversations at once, and both servers' slots (default 16)")
    ap.add_argument("--scenario", choices=["multi", "concurrent"], action="append",
                    help="run only this scenario (repeatable; default both)")
    ap.add_argument("--only", choices=["ours", "llama"], help="benchmark one server only")
    ap.add_argument("--ours-bin", help="our binary (default: target/release/llm-worker-rbee-cpu, built if missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release for the default binary first")
    ap.add_argument("--llama-server", help="llama-server binary (default: the reference build's)")
    ap.add_argument("--ctx-size", type=int, default=2048, help="our --ctx-size, per sequence (default 2048)")
    ap.add_argument("--llama-ctx-size", type=int, default=32768, help="llama-server -c, split among its slots (default 32768)")
    ap.add_argument("--ours-arg", action="append", default=[], metavar="ARG", help="extra argument for our worker (repeatable)")
    ap.add_argument("--llama-arg", action="append", default=None, metavar="ARG",
                    help="llama-server's cache arguments (repeatable; default: --cache-prompt "
                         "--cache-reuse 256)")
    ap.add_argument("--json", metavar="OUT", help="write every number (per request too) to OUT")
    ap.add_argument("--log-dir", help="keep the servers' logs here (default: a temporary folder)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one socket read may take (default 300)")
    ap.add_argument("--scenario-timeout", type=float, default=900.0, help="seconds the concurrent scenario may take (default 900)")
    ap.add_argument("--listen-timeout", type=float, default=60.0, help="seconds until a server logs its port (default 60)")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds until /health is 200 (default 300)")
    ap.add_argument("--wait-quiet", type=float, default=120.0, metavar="S",
                    help="before each scenario, wait up to S seconds for a quiet machine (0: do not wait; default 120)")
    ap.add_argument("--quiet-threshold", type=float, default=0.2, metavar="CORES",
                    help="other processes' CPU above which a measurement counts as noisy (default 0.2)")
    ap.add_argument("--quiet-window", type=float, default=5.0, metavar="S",
                    help="how long the machine must stay quiet before a scenario (default 5)")
    ap.add_argument("--retries", type=int, default=1,
                    help="measure a noisy scenario again up to this many times (default 1)")
    ap.add_argument("--cooldown", type=float, default=3.0, help="seconds of rest between servers (default 3)")
    args = ap.parse_args()
    for name in ("threads", "turns", "turn_tokens", "max_tokens", "rounds", "conversations"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.turns < 2:
        ap.error("--turns must be at least 2 (turn 1 has nothing to reuse)")
    if args.llama_arg is None:
        args.llama_arg = ["--cache-prompt", "--cache-reuse", "256"]
    return args


def main():
    args = parse_args()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    atexit.register(bh.stop_all_servers)

    tmp = None
    try:
        if args.log_dir:
            log_dir = Path(args.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="bench_prefix_cache.")
            log_dir = Path(tmp.name)
        model = args.model or bh.default_model()
        if not Path(model).is_file():
            raise bh.BenchError(f"model {model} not found")
        n = args.conversations
        if args.llama_ctx_size // n < args.ctx_size and args.only != "ours":
            log(f"warning: llama-server's slots get {args.llama_ctx_size // n} positions each, "
                f"ours {args.ctx_size}")
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": bh.cpu_model(),
                "load_before": bh.loadavg(), "model": model, "git": bh.git_state(),
                "ours_version": "–", "llama_version": "–"}
        servers = []
        if args.only != "llama":
            ours_bin = bh.ours_binary(args)
            meta["ours_version"] = bh.version_of([str(ours_bin), "--version"])
            servers.append(bh.Server("ours", "ours", [
                str(ours_bin), "--model", model, "--host", "127.0.0.1", "--port", "0",
                "--parallel", str(n), "--ctx-size", str(args.ctx_size),
                "--threads", str(args.threads), *args.ours_arg,
            ], log_dir, env=bh.clean_env()))
        if args.only != "ours":
            llama_bin = bh.llama_server_binary(args)
            meta["llama_version"] = bh.version_of([str(llama_bin), "--version"])
            servers.append(bh.Server("llama", "llama.cpp", [
                str(llama_bin), "-m", model, "--host", "127.0.0.1", "--port", "0",
                "-t", str(args.threads), "-np", str(n), "-c", str(args.llama_ctx_size),
                "--cont-batching", *args.llama_arg,
            ], log_dir))
        scenarios = args.scenario or ["multi", "concurrent"]
        results = {s.name: {} for s in servers}
        first = True
        for scenario in scenarios:
            for server in servers:
                if not first:
                    time.sleep(args.cooldown)
                first = False
                res = bench_server(server, scenario, args)
                results[server.name][scenario] = res
                if scenario == "multi":
                    s = multi_summary(res)
                    log(f"{server.label}: multi-turn TTFT per turn "
                        f"{[fmt(t['ttft_ms'], 0) for t in s['per_turn']]} ms; last turn again "
                        f"uncached {fmt(s['uncached_ms'], 0)}, cached {fmt(s['recached_ms'], 0)} ms")
                else:
                    s = concurrent_summary(res)
                    log(f"{server.label}: {n} conversations, TTFT turns 2+ p50 "
                        f"{fmt(s['ttft_later_p50_ms'], 0)} ms, p95 {fmt(s['ttft_later_p95_ms'], 0)}"
                        f" ms; {s['failed']} failed")

        commands = [shlex.join([sys.executable, *sys.argv])] + [shlex.join(s.argv) for s in servers]
        print(report(results, args, commands, meta))
        check_reuse(results)

        failed = 0
        for name, r in results.items():
            recs = []
            if "multi" in r:
                for rd in r["multi"]["rounds"]:
                    recs += rd["turns"] + [x for x in (rd.get("uncached"), rd.get("recached")) if x]
            if "concurrent" in r:
                recs += [t for conv in r["concurrent"]["conversations"] for t in conv]
            bad = [x["error"] for x in recs if x.get("error")]
            if bad:
                failed += len(bad)
                log(f"{name}: {len(bad)} request(s) failed; first errors: {bad[:3]}")
            for sc, res in r.items():
                other = res.get("other_cpu_cores")
                if other is not None and other > args.quiet_threshold:
                    log(f"warning: other processes used {other:.2f} cores while {name}, {sc}, "
                        "was measured: its numbers are noisy")
        if args.json:
            doc = {"args": vars(args), "meta": meta, "commands": commands, "results": results}
            Path(args.json).write_text(json.dumps(doc, indent=1))
            log(f"raw numbers written to {args.json}")
        return 1 if failed else 0
    except bh.BenchError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); stopping the servers")
        return 130
    finally:
        bh.stop_all_servers()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
