"""Run benchmark configurations one after another, each in a fresh Python subprocess, so that one
configuration's allocator cache or RSS high-water mark cannot leak into another's measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2])


def run_workers(script: str, runs: dict[str, list[str]]) -> list[dict]:
    """``python script --worker NAME ARGS...`` for each ``NAME -> ARGS``; each worker prints one JSON
    line last. Returns the parsed rows in order; a failing worker raises with its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    rows = []
    for name, args in runs.items():
        cmd = [sys.executable, os.path.abspath(script), "--worker", name, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"benchmark configuration {name} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  {name}: done", file=sys.stderr)
    return rows


def write_results(out: str | os.PathLike, text: str) -> Path:
    """Write a benchmark's Markdown result atomically (folder created): a killed benchmark never leaves a
    half-written results file in ``benchmarks/results/``."""
    from tpp_monai.safe_io import atomic_write

    return atomic_write(out, text)
