"""Load on the Gradio demo: concurrent users of one ``mm demo`` server, through gradio_client.

The demo (demo/app.py) is served by a subprocess on 127.0.0.1 with the launch settings of ``mm demo``; it
reports its engine's batch sizes on request (``engine.batch_sizes``), so the batching is seen. Each user is a
thread with its own ``gradio_client.Client`` (its own session) asking its questions one after the other, each
a new chat with a bundled ShapesWorld image (the 4 examples in turn), greedy, at most ``--max-new-tokens``
tokens. First one user alone (the baseline), then ``--users`` users at once. Latency: from submitting a
question to its last streamed update.

    python bench/demo_load.py --json bench/results/demo_load_cpu.json   # CPU, a few minutes
    python bench/demo_load.py --model quickstart/run/model              # a trained model

Without ``--model`` the model is the quickstart recipe's architecture (d=192, 3 layers, 36 visual tokens per
96 px image) with random weights: the same cost per token as the trained one, answers of little sense.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build_quickstart_shaped(out_dir: Path) -> Path:
    """The quickstart recipe's model section, random weights, saved as ``mm train`` saves models."""
    import torch
    import yaml

    from mm.build import build_tokenizer, build_vlm, make_processor, save_vlm
    from mm.config import ModelConfig, build
    from mm.recipes import __file__ as recipes_init

    recipe = yaml.safe_load((Path(recipes_init).parent / "quickstart.yaml").read_text())
    section = build(ModelConfig, recipe["model"], "model")
    from demo.shapes_examples import load_examples

    texts = [t for e in load_examples() for t in (e["question"], e["answer"])]
    corpus = texts * 50 + ["a small red circle left of a big blue square, the word bird is written"] * 50
    torch.manual_seed(0)
    tokenizer = build_tokenizer(section, corpus)
    model = build_vlm(section, tokenizer).eval()
    return save_vlm(model, make_processor(model, tokenizer), out_dir)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_users(url: str, users: int, questions: int, max_new_tokens: int, examples: list[dict]) -> dict:
    """``users`` threads, each asking ``questions`` questions in turn; latencies, errors, wall time."""
    from gradio_client import Client, handle_file

    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    clients = [Client(url, verbose=False, download_files=False) for _ in range(users)]  # before the clock
    start_line = threading.Barrier(users + 1)

    def user(u: int) -> None:
        client = clients[u]
        start_line.wait()
        for q in range(questions):
            example = examples[(u + q) % len(examples)]
            message = {"text": example["question"], "files": [handle_file(example["image"])]}
            t0 = time.perf_counter()
            try:
                out = client.submit(message, [], max_new_tokens, 0, 1, 0, api_name="/chat").result(
                    timeout=600
                )
                answer = out[0][-1]["content"][0]["text"]
                found = re.search(r"\((\d+) tokens in", out[3] or "")
                assert answer.strip() and found, f"no answer or stats: {out[0][-1]!r} {out[3]!r}"
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens.append(int(found.group(1)))
            except Exception as err:  # counted, not fatal: the point is how many there are
                with lock:
                    errors.append(f"user {u} question {q}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    start_line.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    done = len(latencies)
    return {
        "users": users,
        "questions_per_user": questions,
        "questions": users * questions,
        "answered": done,
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": round(wall, 2),
        "p50_s": round(percentile(latencies, 0.5), 3) if done else None,
        "p95_s": round(percentile(latencies, 0.95), 3) if done else None,
        "max_s": round(max(latencies), 3) if done else None,
        "questions_per_s": round(done / wall, 3),
        "new_tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_new_tokens": round(statistics.mean(tokens), 1) if done else None,
    }


def serve(model_dir: str, concurrency: int, device: str | None) -> int:
    """The server process (``--serve``): the demo as ``mm demo`` serves it; prints ``READY URL``, then answers
    each ``batches`` line on stdin with the engine's batch-size histogram as JSON; stops at EOF."""
    from demo import app as demo_app

    app, engine = demo_app.create(model_dir, device=device, concurrency=concurrency)
    if engine is None:
        print(f"ERROR cannot load the model in {model_dir}", flush=True)
        return 2
    app.launch(**demo_app.launch_kwargs(port=None), prevent_thread_lock=True, quiet=True)
    info = {
        "model_params": sum(p.numel() for p in engine.model.parameters()),
        "visual_tokens_per_image": engine.processor.tokens_per_image,
        "device": str(engine.device),
        "torch_threads": __import__("torch").get_num_threads(),
    }
    print(f"READY http://127.0.0.1:{app.server_port} {json.dumps(info)}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "batches":
                print(json.dumps(dict(sorted(engine.batch_sizes.items()))), flush=True)
    finally:
        app.close(verbose=False)
        engine.close()
    return 0


class Server:
    """``demo_load.py --serve`` in a subprocess: the clients' threads do not share its interpreter."""

    def __init__(self, model_dir: Path, concurrency: int, device: str | None, log: Path):
        cmd = [sys.executable, __file__, "--serve", str(model_dir), "--concurrency", str(concurrency)]
        if device:
            cmd += ["--device", device]
        self.log = log
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
        )
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"the demo server did not start: {line.strip()}\n{log.read_text()[-3000:]}")
        _, self.url, info = line.split(" ", 2)
        self.info = json.loads(info)

    def batches(self) -> Counter:
        self.proc.stdin.write("batches\n")
        self.proc.stdin.flush()
        return Counter({int(k): v for k, v in json.loads(self.proc.stdout.readline()).items()})

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: quickstart-shaped, random init)")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--questions", type=int, default=5, help="questions per user")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8, help="the demo's --concurrency (engine max batch)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # the server process, on this model
    args = p.parse_args(argv)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.serve:
        return serve(args.serve, args.concurrency, args.device)

    from demo.shapes_examples import load_examples

    work = Path(tempfile.mkdtemp(prefix="mm-demo-load-"))
    os.environ["GRADIO_TEMP_DIR"] = str(work / "uploads")  # the server's uploads: removed with ``work``
    load_before = os.getloadavg()
    try:
        model_dir = Path(args.model) if args.model else build_quickstart_shaped(work / "model")
        server = Server(model_dir, args.concurrency, args.device, work / "server.log")
        examples = load_examples()
        try:
            run_users(server.url, 1, 2, args.max_new_tokens, examples)  # warm-up: first calls, caches
            before = server.batches()
            single = run_users(server.url, 1, args.questions, args.max_new_tokens, examples)
            middle = server.batches()
            many = run_users(server.url, args.users, args.questions, args.max_new_tokens, examples)
            after = server.batches()
        finally:
            server.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r, hist in ((single, middle - before), (many, after - middle)):
        r["batch_sizes"] = dict(sorted(hist.items()))
        r["mean_batch_size"] = round(sum(k * v for k, v in hist.items()) / max(1, hist.total()), 2)
    many["throughput_vs_single"] = round(many["questions_per_s"] / single["questions_per_s"], 2)

    header = (
        f"{'users':>5} {'questions':>9} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'q/s':>6} {'tok/s':>7}"
        f"  {'vs 1 user':>9}  batch sizes (count)"
    )
    print(header)
    for r in (single, many):
        ratio = r["questions_per_s"] / single["questions_per_s"]
        print(
            f"{r['users']:>5} {r['answered']:>4}/{r['questions']:<4} {r['errors']:>6} {r['p50_s']:>7} "
            f"{r['p95_s']:>7} {r['questions_per_s']:>6} {r['new_tokens_per_s']:>7}  {ratio:>8.2f}x"
            f"  {r['batch_sizes']} (mean {r['mean_batch_size']})"
        )
    for line in single["error_samples"] + many["error_samples"]:
        print("error:", line)

    result = {
        "bench": "demo_load",
        "date": datetime.date.today().isoformat(),
        "command": "python bench/demo_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": str(args.model) if args.model else "quickstart recipe architecture, random init",
        **server.info,
        "max_new_tokens": args.max_new_tokens,
        "concurrency": args.concurrency,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "server": "demo/app.py in a subprocess on 127.0.0.1 (mm demo's launch settings); gradio_client "
        "threads in this process, one Client (session) per user",
        "single_user": single,
        "concurrent": many,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if single["errors"] or many["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
