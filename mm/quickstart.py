"""``mm quickstart``: ShapesWorld -> train the tiny default VLM here -> evaluate -> metrics.json."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import apply_overrides, config_from_dict

RECIPE = "quickstart.yaml"


def recipe() -> dict[str, Any]:
    """The quickstart recipe: data size, model and schedule (mm/recipes/quickstart.yaml)."""
    return yaml.safe_load(resources.files("mm.recipes").joinpath(RECIPE).read_text())


def run_quickstart(
    out: Path,
    *,
    minutes: float | None = None,
    steps: int | None = None,
    n: int | None = None,
    blind: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
    reuse_data: bool = True,
) -> Path:
    from data.boxes import BoxFormat
    from data.schema import load_llava_json, write_json_atomic
    from data.shapesworld import generate

    from .build import load_vlm
    from .evaluate import box_format_for, evaluate
    from .report import console, print_metrics, print_samples

    t0 = time.perf_counter()
    spec = apply_overrides(recipe(), list(overrides or []))
    data_spec = spec.pop("shapesworld")
    if n is not None:
        data_spec["n"] = n
    out = Path(out)
    data_dir = out / "data"
    info_path = data_dir / "shapesworld.json"
    reuse = (
        reuse_data and info_path.is_file() and json.loads(info_path.read_text()).get("n") == data_spec["n"]
    )
    if not reuse:
        console.print(f"[bold]1/3[/bold] generating ShapesWorld ({data_spec['n']} images) in {data_dir}")
        generate(
            data_dir,
            n=data_spec["n"],
            seed=data_spec.get("seed", 0),
            image_size=data_spec["image_size"],
            box_format=BoxFormat(frame=data_spec.get("box_frame", 1000)),
            progress=progress,
        )
    else:
        console.print(f"[bold]1/3[/bold] reusing ShapesWorld in {data_dir}")
    run_dir = out / ("run_blind" if blind else "run")
    spec.setdefault("data", {}).update(
        train=str(data_dir / "train.json"), val=str(data_dir / "val.json"), blind=blind
    )
    spec.setdefault("train", {})["output_dir"] = str(run_dir)
    if minutes is not None:
        spec["train"]["max_minutes"] = minutes
    if steps is not None:
        spec["train"]["max_steps"] = steps
    cfg = config_from_dict(spec)
    budget = f"{cfg.train.max_steps} steps" + (
        f" or {cfg.train.max_minutes:g} min" if cfg.train.max_minutes else ""
    )
    console.print(
        f"[bold]2/3[/bold] training the tiny VLM ({budget}) in {run_dir}" + (" [blind]" if blind else "")
    )
    from .train import train

    t_train = time.perf_counter()
    export = train(cfg, resume=False, progress=progress)
    train_minutes = (time.perf_counter() - t_train) / 60

    console.print(f"[bold]3/3[/bold] evaluating {export} on the test split")
    from .inference import pick_device

    model, processor = load_vlm(export, device=pick_device())
    test = data_dir / "test.json"
    metrics, rows = evaluate(
        model,
        processor,
        load_llava_json(test),
        data_dir,
        box_format_for(test),
        blind=blind,
        progress=progress,
    )
    metrics["train_minutes"] = round(train_minutes, 2)
    metrics["total_minutes"] = round((time.perf_counter() - t0) / 60, 2)
    metrics["blind"] = blind
    metrics["model_dir"] = str(export.resolve())
    print_metrics(metrics, title="ShapesWorld test split" + (" (blind)" if blind else ""))
    print_samples(rows, str(data_dir))
    predictions = out / ("predictions_blind.jsonl" if blind else "predictions.jsonl")
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics_path = out / ("metrics_blind.json" if blind else "metrics.json")
    write_json_atomic(metrics_path, metrics)
    return metrics_path
