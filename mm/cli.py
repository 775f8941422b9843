"""The ``mm`` command: quickstart, data, train, eval, chat."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("mm").setLevel(logging.INFO)
    for noisy in ("accelerate", "transformers", "DeepSpeed", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


V2PE_HELP = (
    "V2PE: each image's visual tokens step by this (default: the model's; e.g. 0.0625 far past training)"
)
KV_METHOD_NAMES = ["full", "lookm", "h2o", "snapkv", "streaming", "random"]  # mm.kv_cache.KV_METHODS


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    """KV-cache compression after the prefill (mm.kv_cache)."""
    parser.add_argument("--kv-method", choices=KV_METHOD_NAMES, default="full", help="KV-cache compression")
    parser.add_argument(
        "--kv-budget", type=float, default=0.2, help="kept share of each prompt (<= 1) or a token count"
    )
    parser.add_argument(
        "--kv-merge",
        choices=["pivotal", "averaged", "weighted", "none"],
        default="pivotal",
        help="LOOK-M's merge",
    )
    parser.add_argument(
        "--kv-queries",
        type=int,
        default=None,
        help="LOOK-M / H2O score with this many evenly spaced prompt queries (default: all, as the papers)",
    )


def kv_from(args: argparse.Namespace):
    from .kv_cache import KVCompression

    if args.kv_method == "full":
        return None
    return KVCompression(args.kv_method, args.kv_budget, args.kv_merge, queries=args.kv_queries)


# -- subcommands ----------------------------------------------------------------------------------
def cmd_data_shapesworld(args: argparse.Namespace) -> int:
    from data.boxes import BoxFormat
    from data.shapesworld import generate

    info = generate(
        args.out,
        n=args.n,
        seed=args.seed,
        image_size=args.image_size,
        box_format=BoxFormat(frame=args.box_frame),
        p_text=args.p_text,
        progress=not args.quiet,
    )
    print(json.dumps(info["counts"], indent=2))
    print(Path(args.out).resolve())
    return 0


def cmd_data_shapesworld_multi(args: argparse.Namespace) -> int:
    from data.shapesworld.multi import generate_multi

    info = generate_multi(
        args.out,
        k={"train": args.train_k, "val": args.train_k, "test": args.test_k},
        records={"train": args.train_records, "val": args.eval_records, "test": args.eval_records},
        pool=args.pool,
        seed=args.seed,
        image_size=args.image_size,
        types=args.types,
        progress=not args.quiet,
    )
    print(json.dumps(info["files"], indent=2))
    print(Path(args.out).resolve())
    return 0


def cmd_data_shapesworld_video(args: argparse.Namespace) -> int:
    from data.shapesworld.video import generate_video

    info = generate_video(
        args.out,
        args.n,
        seed=args.seed,
        frames=args.frames,
        fps=args.fps,
        image_size=args.size,
        progress=not args.quiet,
    )
    print(json.dumps({"counts": info["counts"], "chance": info["chance"]}, indent=2))
    print(Path(args.out).resolve())
    return 0


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    """``mm train`` and ``python -m mm.train`` (what torchrun / deepspeed / accelerate launch run)."""
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    t.add_argument("--resume-from", metavar="DIR", help="continue from this checkpoint folder (step_N)")
    t.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run's checkpoints and logs in output_dir"
    )
    t.add_argument(
        "--strict", action="store_true", help="stop at a record that breaks the schema (default: skip)"
    )
    t.add_argument(
        "--deepspeed", metavar="JSON", help="a DeepSpeed config (configs/deepspeed/); sets train.deepspeed"
    )
    # the deepspeed launcher passes --local_rank; the rank is read from the environment
    t.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    t.add_argument("--quiet", action="store_true")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    overrides = list(args.overrides) + (["data.strict=true"] if args.strict else [])
    overrides += [f"train.deepspeed={args.deepspeed}"] if args.deepspeed else []
    cfg = load_config(args.config, overrides)
    export = train(
        cfg,
        resume=args.resume,
        resume_from=args.resume_from,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(export.resolve())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from data.schema import write_bytes_atomic, write_json_atomic

    from .evaluate import evaluate_file
    from .inference import Engine
    from .report import print_metrics

    kv = kv_from(args)  # bad KV settings fail before the model loads
    engine = Engine.load(
        args.model, device=args.device, visual_delta=args.v2pe_delta, max_batch=args.batch_size
    )
    if args.max_length:
        engine.processor.max_length = args.max_length
    metrics, rows, skips = evaluate_file(
        engine,
        args.data,
        image_folder=args.image_folder,
        media_roots=args.media_root or (),
        strict=args.strict,
        limit=args.limit or None,
        scorer=args.scorer,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        blind=args.blind,
        kv=kv,
        progress=not args.quiet,
    )
    print_metrics(metrics, title=f"{args.model} on {args.data}")
    if skips.count("eval"):
        print(skips.summary("eval", len(rows)), file=sys.stderr)
    if args.predictions:
        write_bytes_atomic(args.predictions, "".join(json.dumps(r) + "\n" for r in rows).encode())
    if args.json:
        write_json_atomic(Path(args.json), metrics)
        print(Path(args.json).resolve())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .inference import Assistant

    kv = kv_from(args)  # bad KV settings fail before the model loads
    assistant = Assistant(args.model, device=args.device, visual_delta=args.v2pe_delta)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        kv=kv,
    )
    if args.question:
        try:
            question, images, videos = " ".join(args.question), list(args.image or []), list(args.video or [])
            for piece in assistant.stream(question, images, videos, **settings):
                print(piece, end="", flush=True)
        except ValueError as err:  # a bad image or video (MediaError) or prompt
            print(f"error: {err}", file=sys.stderr)
            return 2
        print()
        return 0
    print(
        "mm chat: type a question; ':image PATH' / ':video PATH' adds an image / a video to the next "
        "question, ':reset' clears the conversation, ':quit' exits"
    )
    pending, pending_videos = list(args.image or []), list(args.video or [])
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in (":quit", ":q", ":exit"):
            return 0
        if line == ":reset":
            assistant.reset()
            pending, pending_videos = [], []
            continue
        if line.startswith(":image "):
            pending.append(line.split(" ", 1)[1].strip())
            continue
        if line.startswith(":video "):
            pending_videos.append(line.split(" ", 1)[1].strip())
            continue
        try:
            for piece in assistant.stream(line, pending, pending_videos, **settings):
                print(piece, end="", flush=True)
            print()
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            if pending:
                print(f"dropped the queued image(s): {', '.join(map(str, pending))}", file=sys.stderr)
            if pending_videos:
                print(f"dropped the queued video(s): {', '.join(pending_videos)}", file=sys.stderr)
        pending, pending_videos = [], []  # used or refused: either way a later question does not carry them


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    metrics_path = run_quickstart(
        out=Path(args.out),
        minutes=args.minutes,
        steps=args.steps,
        n=args.n,
        blind=args.blind,
        overrides=args.overrides,
        progress=not args.quiet,
        reuse_data=not args.fresh_data,
        recipe_name=args.recipe,
    )
    print(metrics_path.resolve())
    return 0


# -- batch captioning and grounding (mm caption, mm ground; mm/batch.py) -----------------------------
def cmd_caption(args: argparse.Namespace) -> int:
    from .batch import batch_command

    return batch_command("caption", args)


def cmd_ground(args: argparse.Namespace) -> int:
    from .batch import batch_command

    return batch_command("ground", args)


def add_batch_parsers(sub) -> None:
    """``mm caption`` and ``mm ground``: the same options, plus ``--object`` for grounding."""
    for task, func, what in (
        ("caption", cmd_caption, "caption many images into a resumable JSONL file"),
        ("ground", cmd_ground, "find an object in many images (boxes in pixels) into a resumable JSONL file"),
    ):
        b = sub.add_parser(task, help=what, description=f"{what}. A rerun skips the ids already in --out.")
        b.add_argument(
            "inputs",
            nargs="+",
            help="a folder (images and videos, recursively), a glob, image or video files, a .txt path "
            "list, a JSONL/JSON list of {id, image}, or a LLaVA .json/.jsonl (videos: mm caption only)",
        )
        b.add_argument("--model", required=True, help="model directory")
        b.add_argument("--out", required=True, help="results JSONL (appended; accelerate: + rank files)")
        if task == "caption":
            b.add_argument(
                "--prompt",
                help="the question (default 'Describe the image.', for a video 'Describe what happens in the "
                "video.')",
            )
        else:
            b.add_argument("--prompt", help="the question template (default 'Where is the {object}?')")
            b.add_argument("--object", help="the object to find in every image (default: each record's)")
        b.add_argument("--batch-size", type=int, default=16, help="images per padded generate")
        b.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 caption, 32 ground")
        b.add_argument("--draw", metavar="DIR", help="write each image with its boxes / caption drawn")
        b.add_argument("--eval", action="store_true", help="score against the input's ground truth")
        b.add_argument("--metrics", help="write --eval's metrics here (default: OUT's name + .metrics.json)")
        b.add_argument("--limit", type=int, default=None, help="answer at most N more inputs in this run")
        b.add_argument("--retry-errors", action="store_true", help="redo the inputs that got error rows")
        b.add_argument(
            "--image-folder", help="where a LLaVA file's relative image paths start (default: its folder)"
        )
        b.add_argument("--media-root", action="append", help="another folder records may point into")
        b.add_argument("--workers", type=int, default=4, help="threads decoding the next batch's images")
        b.add_argument("--device", default=None)
        b.add_argument("--v2pe-delta", type=float, default=None, help=V2PE_HELP)
        b.add_argument("--quiet", action="store_true", help="no progress bar")
        b.set_defaults(func=func)


# -- end of mm caption / mm ground -----------------------------------------------------------------


# -- mm demo: the Gradio chat demo (demo/app.py) ---------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from demo.app import serve

    return serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        concurrency=args.concurrency,
        max_file_size=args.max_file_size,
    )


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="chat about images in a browser (Gradio; default: the quickstart model)")
    d.add_argument("--model", default=None, help="model directory (default ./quickstart/run/model)")
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best there is)")
    d.add_argument("--concurrency", type=int, default=8, help="questions answered at once, in one batch")
    d.add_argument("--max-file-size", default="10mb", help="largest upload (e.g. 10mb)")
    d.set_defaults(func=cmd_demo)


# -- end of mm demo --------------------------------------------------------------------------------


# -- mm export: a LoRA model with its adapter merged (mm/lora.py) ----------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from .lora import merge_export

    print(merge_export(args.model_dir, args.out_dir).resolve())
    return 0


def add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="write a LoRA model with its adapter merged: a plain model directory")
    x.add_argument("model_dir", help="the LoRA model directory (a run's model/, with lora/)")
    x.add_argument("out_dir", help="where the merged model goes (loads without peft)")
    x.add_argument("--merge", action="store_true", required=True, help="merge the adapter into the LLM")
    x.set_defaults(func=cmd_export)


# -- end of mm export ------------------------------------------------------------------------------


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mm", description="mmstack: train, evaluate and chat with vision-language models"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quickstart",
        help="generate ShapesWorld, train the tiny default model (replacing OUT/run), evaluate it",
    )
    q.add_argument("--out", default="quickstart", help="output directory (default ./quickstart)")
    q.add_argument(
        "--recipe",
        default="quickstart",
        help="packaged recipe name (quickstart: the CPU budget; quickstart_full: meets the accuracy targets, "
        "~1 h on 2 CPU cores) or a YAML file",
    )
    q.add_argument("--minutes", type=float, default=None, help="training time budget (default: the recipe's)")
    q.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    q.add_argument(
        "--n", type=int, default=None, help="ShapesWorld images to generate (default: the recipe's)"
    )
    q.add_argument("--blind", action="store_true", help="blank every image (the no-vision baseline)")
    q.add_argument("--fresh-data", action="store_true", help="regenerate the data even if it exists")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-3")
    q.set_defaults(func=cmd_quickstart)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="dataset", required=True)
    s = dsub.add_parser("shapesworld", help="generate ShapesWorld images + LLaVA JSON")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument(
        "--box-frame",
        type=int,
        default=1000,
        help="boxes as integers 0..FRAME (train with data.box_format.frame=FRAME)",
    )
    s.add_argument("--p-text", type=float, default=0.3)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_data_shapesworld)
    m = dsub.add_parser(
        "shapesworld-multi", help="long multi-image ShapesWorld: K images per conversation (V2PE's test)"
    )
    m.add_argument("--out", required=True)
    m.add_argument("--train-k", type=int, nargs="+", default=[1, 2, 4, 8], help="K per training record")
    m.add_argument(
        "--test-k", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="a test file per K"
    )
    m.add_argument("--train-records", type=int, default=20000)
    m.add_argument("--eval-records", type=int, default=500, help="records per val / test file")
    m.add_argument("--pool", type=int, default=2000, help="rendered scenes per split that records draw from")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--image-size", type=int, default=96)
    m.add_argument(
        "--types",
        nargs="+",
        default=["lookup", "find_text", "count_images", "needle", "retrieve"],
        help="question types asked (default: all)",
    )
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_data_shapesworld_multi)
    v = dsub.add_parser(
        "shapesworld-video", help="ShapesWorld mp4 clips: motion / order / count / state / caption questions"
    )
    v.add_argument("out", help="dataset folder (a rerun with the same settings keeps the clips there)")
    v.add_argument("--n", type=int, default=1000, help="clips in all, split 80/10/10 (5 records per clip)")
    v.add_argument("--frames", type=int, default=16)
    v.add_argument("--fps", type=float, default=8.0)
    v.add_argument("--size", type=int, default=96, help="frame side in pixels (even, >= 96)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_data_shapesworld_video)

    t = sub.add_parser("train", help="train from a YAML config")
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model directory on a LLaVA JSON file")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True, help="LLaVA .json / .jsonl; meta.task picks each record's scorer")
    e.add_argument("--json", help="write metrics to this JSON file")
    e.add_argument(
        "--predictions", help="write one row per record (JSONL): prediction and score, or why skipped"
    )
    e.add_argument(
        "--scorer", help="score every record with this scorer (exact_match, object_recall, box_iou)"
    )
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: each scorer's budget")
    e.add_argument(
        "--image-folder", help="where relative image paths start (default: the JSON file's folder)"
    )
    e.add_argument("--media-root", action="append", help="another folder records may point into (repeatable)")
    e.add_argument("--strict", action="store_true", help="stop at a record that breaks the schema")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--limit", type=int, default=0, help="only the first N records of the file")
    e.add_argument("--blind", action="store_true", help="blank the images")
    e.add_argument("--device", default=None)
    e.add_argument("--v2pe-delta", type=float, default=None, help=V2PE_HELP)
    e.add_argument(
        "--max-length", type=int, default=None, help="longest prompt (default: the training max_length)"
    )
    add_kv_arguments(e)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("chat", help="ask about images (one-shot with a question, else an interactive REPL)")
    c.add_argument("--model", required=True)
    c.add_argument("--image", action="append", help="image file (repeatable)")
    c.add_argument("--video", action="append", help="video file (repeatable; sampled as in training)")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--device", default=None)
    c.add_argument("--v2pe-delta", type=float, default=None, help=V2PE_HELP)
    add_kv_arguments(c)
    c.add_argument("question", nargs="*")
    c.set_defaults(func=cmd_chat)
    add_batch_parsers(sub)  # mm caption, mm ground
    add_demo_parser(sub)  # mm demo
    add_export_parser(sub)  # mm export --merge
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from data.skips import NothingUsable

    try:
        return args.func(args)
    except NothingUsable as err:  # the job ran, but every input was skipped
        print(f"mm {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:
        print(f"mm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
