"""``mm quickstart``: ShapesWorld -> train the tiny default VLM here -> evaluate -> metrics.json."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import apply_overrides, config_from_dict

RECIPE = "quickstart"


def recipe(name: str = RECIPE) -> dict[str, Any]:
    """A quickstart recipe (data size, model, schedule): a name in mm/recipes/ or a YAML file path.

    ``quickstart`` fits the 2-core CPU budget; ``quickstart_full`` is the design that meets the accuracy
    targets (about an hour on 2 cores, minutes on a GPU).
    """
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        packaged = resources.files("mm.recipes").joinpath(f"{name}.yaml")
        if not packaged.is_file():
            files = resources.files("mm.recipes").iterdir()
            known = sorted(p.name.removesuffix(".yaml") for p in files if p.name.endswith(".yaml"))
            raise ValueError(f"unknown recipe {name!r}: not a YAML file; packaged recipes: {known}")
        text = packaged.read_text()
    spec = yaml.safe_load(text)
    if not isinstance(spec, dict) or "shapesworld" not in spec:
        raise ValueError(f"recipe {name!r} must be a mapping with a 'shapesworld' section")
    return spec


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
    recipe_name: str = RECIPE,
) -> Path:
    """Generate (or reuse) the data, train from scratch in ``out/run`` (replacing an earlier quickstart run
    there), evaluate on the test split and write ``out/metrics.json``; returns its path."""
    from data.boxes import BoxFormat
    from data.schema import write_bytes_atomic, write_json_atomic
    from data.shapesworld import ensure_dataset

    from .evaluate import evaluate_file
    from .inference import Engine
    from .report import console, print_metrics, print_samples
    from .train import train

    t0 = time.perf_counter()
    spec = apply_overrides(recipe(recipe_name), list(overrides or []))
    data_spec = spec.pop("shapesworld")
    if n is not None:
        data_spec["n"] = n
    out = Path(out)
    data_dir = out / "data"
    box_format = BoxFormat(frame=data_spec.get("box_frame", 1000))
    console.print(f"[bold]1/3[/bold] ShapesWorld ({data_spec['n']} images) in {data_dir}")
    _, reused = ensure_dataset(
        data_dir,
        n=data_spec["n"],
        reuse=reuse_data,
        seed=data_spec.get("seed", 0),
        image_size=data_spec["image_size"],
        box_format=box_format,
        progress=progress,
    )
    if reused:
        console.print("    reusing the images generated earlier")
    run_dir = out / ("run_blind" if blind else "run")
    spec.setdefault("data", {}).update(
        train=str(data_dir / "train.json"),
        val=str(data_dir / "val.json"),
        blind=blind,
        box_format={"frame": box_format.frame, "template": box_format.template},
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
    t_train = time.perf_counter()
    export = train(cfg, overwrite=True, progress=progress)
    train_minutes = (time.perf_counter() - t_train) / 60

    console.print(f"[bold]3/3[/bold] evaluating {export} on the test split")
    metrics, rows, _ = evaluate_file(
        Engine.load(export), data_dir / "test.json", blind=blind, progress=progress
    )
    metrics["train_minutes"] = round(train_minutes, 2)
    metrics["total_minutes"] = round((time.perf_counter() - t0) / 60, 2)
    metrics["blind"] = blind
    metrics["model_dir"] = str(export.resolve())
    print_metrics(metrics, title="ShapesWorld test split" + (" (blind)" if blind else ""))
    print_samples(rows, str(data_dir))
    predictions = out / ("predictions_blind.jsonl" if blind else "predictions.jsonl")
    write_bytes_atomic(predictions, "".join(json.dumps(r) + "\n" for r in rows).encode())
    metrics_path = out / ("metrics_blind.json" if blind else "metrics.json")
    write_json_atomic(metrics_path, metrics)
    return metrics_path
