"""ShapesWorld: procedurally drawn scenes of coloured shapes (and a word or number) with tasks whose answers
are known exactly, so a tiny VLM can be trained and scored on a CPU.

- ``scene``: the world (shapes, colours, sizes, words), scene sampling and drawing;
- ``tasks``: captions, questions, grounding and box description of a scene, as LLaVA records;
- ``generate``: images + ``train/val/test.json`` + ``shapesworld.json`` on disk;
- ``video``: mp4 clips (shapes move, appear, leave, change colour) and temporal questions;
- ``scoring``: its QA-type breakdown, registered with the generic scorers of ``data.scoring``.
"""

from .generate import (
    INFO_FILE,
    SPLITS,
    all_texts,
    ensure_dataset,
    example,
    generate,
    png_bytes,
    scene_rng,
    split_sizes,
    vocabulary,
)
from .scene import (
    ATTRIBUTES,
    COLOURS,
    OBJECT_GAP_FRACTION,
    SHAPES,
    SIZES,
    UNIT_SHAPES,
    WORDS,
    Background,
    Scene,
    SceneObject,
    sample_scene,
)
from .tasks import QA_TYPES, TASKS, make_tasks, objects_meta, unique_description

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "INFO_FILE",
    "OBJECT_GAP_FRACTION",
    "QA_TYPES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TASKS",
    "UNIT_SHAPES",
    "WORDS",
    "Background",
    "Scene",
    "SceneObject",
    "all_texts",
    "ensure_dataset",
    "example",
    "generate",
    "make_tasks",
    "objects_meta",
    "png_bytes",
    "sample_scene",
    "scene_rng",
    "split_sizes",
    "unique_description",
    "vocabulary",
]
