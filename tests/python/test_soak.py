"""scripts/soak.py, briefly: the script others rerun for RELIABILITY.md still runs, its mixed
load passes its own checks against the current binary, and its table has what it promises."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_short_soak_passes_its_checks(tmp_path):
    table = tmp_path / "soak.md"
    args = [sys.executable, str(REPO / "scripts/soak.py"), "--duration", "12", "--clients", "12",
            "--sample-every", "4", "--bin", os.environ["LLM_WORKER_BIN"],
            "--markdown", str(table), "--max-rss-growth", "1000"]
    if os.environ.get("LLM_WORKER_MODEL"):
        args += ["--model", os.environ["LLM_WORKER_MODEL"]]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    text = table.read_text()
    for kind in ("job_stream", "job_cancel", "job_reattach", "chat_stream", "chat_disconnect",
                 "completion", "bad_input"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {kind} |"))
        ok = int(row.split("|")[2])
        assert ok > 0, f"no {kind} request succeeded:\n{text}"
    assert "FAIL" not in text, text
    assert "| t (s) | RSS (MiB) | open fds | KV caches (MiB) | of which prefix cache (MiB) |" in text
