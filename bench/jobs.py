"""Run a bench script's child jobs as separate processes, a few at a time, each with its own log.

Benches that train several models (``v2pe_length.py``, ``video_accuracy.py``) run each in a fresh process, so
one job's memory and threads never leak into another's and several can share a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def run_jobs(
    script: str, jobs: dict[str, list[str]], parallel: int, logs: Path, threads: int = 2
) -> dict[str, int]:
    """``python script *args`` for every named job, at most ``parallel`` at once; stdout and stderr go to
    ``logs/<name>.log``. Returns each job's exit code by name."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, codes = list(jobs.items()), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, args = pending.pop(0)
            log = open(logs / f"{name}.log", "w")  # closed when the job ends
            proc = subprocess.Popen(
                [sys.executable, script, *args], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            running.append((name, proc, log))
        time.sleep(1)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                codes[name] = proc.returncode
                print(f"  {name}: exit {proc.returncode} (log: {logs / f'{name}.log'})", flush=True)
    return codes
