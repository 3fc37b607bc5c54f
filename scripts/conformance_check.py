#!/usr/bin/env python3
"""Check a running worker against llama.cpp's greedy generations of the default model
(shared/conformance/generate.json), through the rbee job API, under the rule in
shared/conformance/README.md:

- prompt: the worker's prompt token count (`end.tokens_in`) equals len(prompt_ids)
  (the job API reports the count, not the ids);
- generation: greedy ids equal llama.cpp's step by step; the first difference is accepted only
  at a near-tie (reference top-2 margin < 0.5), and later steps are not compared; on every
  matched step the token's log-probability is within 0.25 of llama.cpp's; when all steps
  agree the stop agrees too (eos or the length limit).

Standard library only, so it runs on a GPU machine with no registry access.

    python3 scripts/conformance_check.py --url http://127.0.0.1:8080 \
        --corpus shared/conformance/generate.json [--token T] [--concurrency 8]

Exit status 0 when every case passes, 1 when one fails, 2 when the worker cannot be used.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import urllib.error
import urllib.request

NEAR_TIE_MARGIN = 0.5
LOGPROB_TOLERANCE = 0.25


class WorkerError(Exception):
    """The worker refused a request or broke a stream."""


def _request(url, token, timeout, data=None):
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = None if data is None else json.dumps(data).encode()
    return urllib.request.urlopen(
        urllib.request.Request(url, data=body, headers=headers), timeout=timeout
    )


def run_job(base_url, body, token=None, timeout=120.0):
    """Creates a job and reads its SSE stream to the terminal event. Returns the list of
    decoded event payloads (dicts with a `type`), the terminal one last."""
    try:
        with _request(f"{base_url}/v1/jobs", token, timeout, body) as resp:
            created = json.load(resp)
    except urllib.error.HTTPError as e:
        raise WorkerError(f"POST /v1/jobs: {e.code} {e.read().decode(errors='replace')}") from e
    events = []
    data_lines = []
    # `timeout` bounds each socket read, so a stalled stream fails instead of hanging.
    with _request(f"{base_url}{created['sse_url']}", token, timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data_lines.append(line[5:].lstrip(" "))
            elif line == "" and data_lines:
                data = "\n".join(data_lines)
                data_lines = []
                if data.startswith("["):  # [DONE] / [ERROR] / [CANCELLED] sentinel
                    continue
                event = json.loads(data)
                events.append(event)
                if event.get("type") in ("end", "error"):
                    return events
    raise WorkerError(f"job {created['job_id']}: stream closed without a terminal event")


def check_case(case, events):
    """Returns (passed, one-line summary)."""
    terminal = events[-1]
    if terminal["type"] == "error":
        return False, f"job failed: {terminal.get('code')}: {terminal.get('message')}"
    tokens = [e for e in events if e["type"] == "token"]
    ids = [e["id"] for e in tokens]
    want = case["generated_ids"]
    if case["stop_reason"] == "eos" and terminal.get("stop_reason") == "EOS":
        # llama.cpp lists the end-of-generation token; the job API sends no event for it.
        want = want[:-1]
    steps = case["steps"]
    if terminal.get("tokens_in") != len(case["prompt_ids"]):
        return False, (
            f"prompt has {terminal.get('tokens_in')} tokens, llama.cpp {len(case['prompt_ids'])}"
        )
    max_delta = 0.0
    for i, (got, expected) in enumerate(zip(ids, want)):
        if got != expected:
            margin = steps[i]["margin"]
            if margin < NEAR_TIE_MARGIN:
                return True, f"diverged at near-tie step {i} (margin {margin:.3f}), max |dlogprob| {max_delta:.3f}"
            return False, f"step {i}: token {got}, llama.cpp {expected} with a clear margin {margin:.3f}"
        logprob = tokens[i].get("logprob")
        if logprob is None:
            return False, f"step {i}: no logprob in the token event"
        delta = abs(logprob - steps[i]["logprob"])
        if delta > LOGPROB_TOLERANCE:
            return False, f"step {i}: token {got} logprob {logprob:.4f}, llama.cpp {steps[i]['logprob']:.4f} (|d| {delta:.3f})"
        max_delta = max(max_delta, delta)
    if len(ids) != len(want):
        return False, f"agreed on {min(len(ids), len(want))} steps but generated {len(ids)} tokens, llama.cpp {len(want)}"
    expected_stop = {"eos": "EOS", "limit": "MAX_TOKENS"}[case["stop_reason"]]
    if terminal["stop_reason"] != expected_stop:
        return False, f"stop {terminal['stop_reason']}, llama.cpp {expected_stop}"
    return True, f"all {len(want)} steps equal, max |dlogprob| {max_delta:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="worker base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--corpus", required=True, help="path of generate.json")
    parser.add_argument("--token", default=os.environ.get("LLORCH_API_TOKEN"), help="API token (default: $LLORCH_API_TOKEN)")
    parser.add_argument("--concurrency", type=int, default=0, help="jobs in flight at once (default: all cases, so the batched path runs)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any one request or stream read may take")
    args = parser.parse_args()

    with open(args.corpus, encoding="utf-8") as f:
        cases = json.load(f)
    base = args.url.rstrip("/")

    def run(case):
        body = {
            "operation": "infer",
            "prompt": case["prompt"],
            "max_tokens": case["n_predict"],
            "temperature": 0,
            "logprobs": True,
            "seed": 0,
        }
        return run_job(base, body, args.token, args.timeout)

    workers = args.concurrency or len(cases)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, cases))
    except (WorkerError, OSError, ValueError) as e:
        print(f"conformance: cannot run the corpus: {e}", file=sys.stderr)
        return 2

    passed = failed = 0
    for i, (case, events) in enumerate(zip(cases, results)):
        ok, summary = check_case(case, events)
        passed += ok
        failed += not ok
        print(f"case {i} [{case['kind']}] {'ok  ' if ok else 'FAIL'} {summary}")
    print(f"conformance: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
