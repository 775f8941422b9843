"""Helpers shared by the demo tests (test_demo.py, test_demo_browser.py): the tiny model that answers the
bundled grounding example with a box, and ``mm demo`` started and stopped as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, MM, overfit, tiny_model_section
from PIL import Image

from demo.shapes_examples import load_examples

GROUND_QUESTION = "Where is the yellow object?"
GROUND_ANSWER = "The yellow diamond is at [333, 33, 414, 153]."  # the box of scene test/0's yellow diamond


def ground_example() -> dict:
    return next(e for e in load_examples() if e["task"] == "ground")


def make_box_model(out_dir: Path) -> Path:
    """A tiny VLM overfitted to answer the bundled grounding example with a sentence holding its box, so the
    demo streams real text and draws a real box; saved as users have models."""
    from mm.build import build_tokenizer, build_vlm, make_processor, save_vlm

    image = Image.open(ground_example()["image"]).convert("RGB")
    torch.manual_seed(6)
    section = tiny_model_section()
    tokenizer = build_tokenizer(section, CORPUS + [GROUND_QUESTION, GROUND_ANSWER] * 40)
    model = build_vlm(section, tokenizer)
    processor = make_processor(model, tokenizer)
    conv = [
        {"from": "human", "value": f"<image>\n{GROUND_QUESTION}"},
        {"from": "gpt", "value": GROUND_ANSWER},
    ]
    batch = processor.collate([processor(conv, [image])])
    assert overfit(model, batch, steps=80, lr=3e-3) < 0.1
    return save_vlm(model.eval(), processor, out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The IPv4/IPv6 addresses with a socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = [bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8)]
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


def start_demo(*args: str, cwd: Path, timeout: float = 90) -> tuple[subprocess.Popen, str, list[str]]:
    """``mm demo ARGS`` as a user runs it; (process, its URL, its output lines) once it serves. The lines
    keep growing: a thread reads the rest of the output, so a chatty server never blocks on a full pipe."""
    if not MM.is_file():
        pytest.skip(f"console script {MM} is not installed (pip install -e .)")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen(
        [str(MM), "demo", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line.rstrip())
        if match := re.search(r"mm demo: serving .* at (http://\S+)", line):
            lines.append(proc.stdout.readline().rstrip())  # where the uploads are kept
            rest = threading.Thread(target=lambda: lines.extend(s.rstrip() for s in proc.stdout), daemon=True)
            rest.start()
            return proc, match.group(1), lines
    proc.kill()
    raise AssertionError("mm demo did not start:\n" + "\n".join(lines[-40:]))


def stop_demo(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
