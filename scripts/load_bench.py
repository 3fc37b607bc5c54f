#!/usr/bin/env python3
"""Load benchmark for a running worker through the rbee job API: N concurrent streams, each a
fixed number of generated tokens (`ignore_eos`, so every stream does the same work). Prints
per-stream and aggregate tokens/s and time to first token.

Standard library only (it shares the job client of conformance_check.py beside it).

    python3 scripts/load_bench.py --url http://127.0.0.1:8080 --streams 16 --max-tokens 128
    python3 scripts/load_bench.py --url ... --streams 1 --max-tokens 64 --show-text   # one greedy generation

Exit status 0 when every stream ended normally, 1 otherwise.
"""

import argparse
import concurrent.futures
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conformance_check import WorkerError, run_job  # noqa: E402

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=16, help="concurrent jobs")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (wrapped in the ChatML template)")
    parser.add_argument("--show-text", action="store_true", help="print each stream's text (greedy, stops at EOS)")
    parser.add_argument("--token", default=os.environ.get("LLORCH_API_TOKEN"))
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any one request or stream read may take")
    args = parser.parse_args()

    base = args.url.rstrip("/")
    prompt = CHAT.format(args.prompt)

    def one(i):
        body = {
            "operation": "infer",
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "seed": i,
            # Equal work per stream for the benchmark; a plain greedy generation stops at EOS.
            "ignore_eos": not args.show_text,
        }
        start = time.monotonic()
        events = run_job(base, body, args.token, args.timeout)
        return time.monotonic() - start, events

    wall_start = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.streams) as pool:
            results = list(pool.map(one, range(args.streams)))
    except (WorkerError, OSError, ValueError) as e:
        print(f"load bench: {e}", file=sys.stderr)
        return 1
    wall = time.monotonic() - wall_start

    failures = 0
    tokens = 0
    ttft, rates = [], []
    for i, (elapsed, events) in enumerate(results):
        end = events[-1]
        if end["type"] != "end":
            failures += 1
            print(f"stream {i}: {end.get('code')}: {end.get('message')}")
            continue
        tokens += end["tokens_out"]
        ttft.append(end["ttft_ms"])
        rates.append(end["tokens_per_sec"])
        if args.show_text:
            text = "".join(e["t"] for e in events if e["type"] == "token")
            print(f"stream {i} ({end['tokens_in']} prompt tokens, {end['tokens_out']} generated, stop {end['stop_reason']}):\n{text}\n")
    if rates:
        print(
            f"streams {args.streams}  generated {tokens} tokens in {wall:.2f}s  "
            f"aggregate {tokens / wall:.1f} tok/s  "
            f"per-stream decode {statistics.median(rates):.1f} tok/s (median)  "
            f"TTFT p50 {statistics.median(ttft):.0f} ms, max {max(ttft):.0f} ms"
        )
    if failures:
        print(f"load bench: {failures} of {args.streams} streams failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
