#!/usr/bin/env python3
"""Regenerates tests/data/families/<family>.json: llama.cpp's greedy generations, with the top
log-probabilities of every step, on small random-weight GGUFs of each model family.

The GGUFs come from the worker's own test code (tests/common/families.rs, through
`cargo test --test families write_family_ggufs -- --ignored`), so the Rust test that compares
against these references (tests/families.rs) rebuilds the very same files from their seeds and
needs neither llama.cpp nor stored weights. Each file is served by llama.cpp's `llama-server`
as shared/conformance/README.md describes (`-t 2 -np 1`, flash attention left at `auto`, f16 KV
cache), and every prompt (token ids) is sent to `POST /completion` with temperature 0, top-k 1
and `n_probs` = the whole vocabulary (pre-sampling log-probabilities of the raw logits).

Standard library only.

    scripts/family_conformance.py [--llama-bin DIR] [--families llama,gemma2-q8_0] [--keep DIR]

DIR defaults to the reference build (../shared/tools/build-llamacpp-reference.sh), found
through $LLAMA_CPP_BIN or ~/.cache/llamacpp-ref/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "data", "families")
DEFAULT_BIN = os.environ.get(
    "LLAMA_CPP_BIN",
    os.path.expanduser(
        "~/.cache/llamacpp-ref/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
    ),
)
FAMILIES = ["llama", "qwen2", "phi3", "gemma2", "gemma3", "mixtral", "qwen2moe", "qwen3moe",
            "phi3-longrope", "llama-q8_0", "gemma2-q8_0", "gemma3-q8_0", "qwen3moe-q8_0"]
VOCAB = 256
N_PREDICT = 24
TOP = 8
NEAR_TIE_MARGIN = 0.5


def prompts():
    """Fixed token-id prompts: short, past the sliding windows in the files (8 and 16), and
    long. Ids 3..255 (1 and 2 are BOS and EOS)."""
    x = 12345
    out = []
    for length in (5, 20, 48):
        ids = []
        for _ in range(length):
            x = (x * 1103515245 + 12345) % (1 << 31)
            ids.append(3 + (x >> 8) % (VOCAB - 3))
        out.append(ids)
    return out


def fnv1a(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=120):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


class Server:
    def __init__(self, bin_dir, model, log_path):
        self.port = free_port()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "llama-server"), "-m", model, "--host", "127.0.0.1",
             "--port", str(self.port), "-t", "2", "-c", "512", "-np", "1"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited; see {log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"llama-server did not start; see {log_path}")
            time.sleep(0.2)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def run_case(server, prompt):
    d = post(f"{server.url}/completion", {
        "prompt": prompt, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1,
        "n_probs": VOCAB, "cache_prompt": False, "post_sampling_probs": False,
        "return_tokens": True,
    })
    generated = d["tokens"]
    steps = []
    for i, p in enumerate(d["completion_probabilities"]):
        top = sorted(p["top_logprobs"], key=lambda t: -t["logprob"])
        assert p["id"] == generated[i] and top[0]["id"] == p["id"], (i, p["id"], top[0])
        steps.append({
            "id": p["id"],
            "logprob": p["logprob"],
            "margin": top[0]["logprob"] - top[1]["logprob"],
            "top": [{"id": t["id"], "logprob": t["logprob"]} for t in top[:TOP]],
        })
    stop = "eos" if d.get("stop_type") == "eos" else "limit"
    near = [i for i, s in enumerate(steps) if s["margin"] < NEAR_TIE_MARGIN]
    return {
        "prompt_ids": prompt,
        "generated_ids": generated,
        "stop_reason": stop,
        "first_near_tie_step": near[0] if near else len(steps),
        "steps": steps,
    }


def version(bin_dir):
    r = subprocess.run([os.path.join(bin_dir, "llama-server"), "--version"],
                       capture_output=True, text=True)
    return " ".join((r.stdout + r.stderr).split())


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", default=DEFAULT_BIN)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--keep", help="write the GGUFs and server logs here and keep them")
    a = ap.parse_args()
    families = a.families.split(",")
    work = a.keep or tempfile.mkdtemp(prefix="family-conformance-")
    os.makedirs(work, exist_ok=True)
    subprocess.run(
        ["cargo", "test", "--test", "families", "write_family_ggufs", "--", "--ignored",
         "--exact"],
        cwd=ROOT, check=True, env={**os.environ, "FAMILY_GGUF_DIR": work},
    )
    os.makedirs(OUT_DIR, exist_ok=True)
    llama_version = version(a.llama_bin)
    for family in families:
        model = os.path.join(work, f"{family}.gguf")
        with open(model, "rb") as f:
            digest = fnv1a(f.read())
        server = Server(a.llama_bin, model, os.path.join(work, f"{family}.server.log"))
        try:
            cases = [run_case(server, p) for p in prompts()]
        finally:
            server.close()
        out = {
            "family": family,
            "gguf_fnv1a64": digest,
            "llama_cpp": llama_version,
            "server_args": "-t 2 -c 512 -np 1 (flash attention auto, f16 KV cache)",
            "n_predict": N_PREDICT,
            "cases": cases,
        }
        path = os.path.join(OUT_DIR, f"{family}.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        margins = [s["margin"] for c in cases for s in c["steps"]]
        print(f"{family}: {path}: {sum(len(c['steps']) for c in cases)} steps, "
              f"{sum(m < NEAR_TIE_MARGIN for m in margins)} near ties, "
              f"stops {[c['stop_reason'] for c in cases]}", file=sys.stderr)


if __name__ == "__main__":
    main()
