"""The typed config tree: every section a dataclass, unknown keys and wrong types rejected with their path."""

from __future__ import annotations

import re

import pytest

from data.boxes import BoxFormat
from mm.config import ConfigError, config_from_dict, load_config, save_config
from projectors import ProjectorConfig
from vision.experts import ExpertConfig


def test_defaults_are_typed_sections():
    cfg = load_config(None)
    assert isinstance(cfg.model.projector, ProjectorConfig) and isinstance(cfg.model.experts[0], ExpertConfig)
    assert cfg.data.box_format == BoxFormat() and cfg.train.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.projector.pol=2"],
            "model.projector.pol: unknown key; known: depth, experts, grid, heads, hidden_dim, layers, pool",
        ),
        (["model.llm.hidden=64"], "model.llm.hidden: unknown key; known: family, hidden_size, "),
        (
            ["model.experts=[{name: a, modle: resnet18}]"],
            "model.experts[0].modle: unknown key; known: feature_index",
        ),
        (["data.box_format.frm=100"], "data.box_format.frm: unknown key; known: frame, template"),
        (["train.lr=fast"], "train.lr: expected a number, got 'fast'"),
        (["train.max_steps=1.5"], "train.max_steps: expected an integer, got 1.5"),
        (["train.stage=pretrain"], "train.stage: expected one of 'align', 'sft', got 'pretrain'"),
        (["train.betas=[0.9]"], "train.betas: expected a list of 2 values, got [0.9]"),
        (["data.cache_pixels=maybe"], "data.cache_pixels: expected true or false, got 'maybe'"),
        (
            ["model.projector.type=qformer"],
            "model.projector.type: expected one of 'concat', 'channel_concat', 'resampler', 'mlp', got",
        ),
        (["model.projector.experts.cnn.pool=2"], "model.projector: settings for unknown expert(s) ['cnn']"),
        (["model.projector.pool_mode=max"], "model.projector.pool_mode: expected one of 'shuffle', 'avg'"),
        (
            ["model.visual_positions=by_row"],
            "model.visual_positions: expected one of 'original', 'share_by_row'",
        ),
        (
            ["model.experts.0.kind=clip"],
            "model.experts[0].kind: unknown expert kind 'clip'; known: timm, open_clip, hf",
        ),
        (["data.box_format.frame=0"], "data.box_format: BoxFormat.frame must be a positive integer, got 0"),
        (
            ["model.llm.path=/llm", "model.llm.hidden_size=64"],
            "model.llm.hidden_size: only for an LLM built from",
        ),
        (["model.experts=[]"], "model.experts: a VLM needs at least one visual expert"),
        (["tain.lr=1"], "tain: unknown section; known: model, data, train"),
        (
            ["data.branch_turns=true", "train.gradient_checkpointing=true"],
            "data.branch_turns: branches reuse",
        ),
        (["data.branch_turns=true", "data.packing=true"], "data.packing: a packed row holds whole samples"),
    ],
)
def test_bad_keys_and_values_are_rejected_with_their_path(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(None, ["model.experts=[{name: main, model: resnet18}]", *overrides])


def test_overrides_reach_list_items_and_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  experts:\n    - {name: a, model: resnet18}\n    - {name: b, model: resnet10t}\n"
    )
    cfg = load_config(
        path, ["model.experts.1.image_size=128", "model.experts[0].frozen=true", "train.lr=1e-3"]
    )
    assert [e.image_size for e in cfg.model.experts] == [None, 128] and cfg.model.experts[0].frozen
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(ConfigError, match=r"model.experts.5.image_size=1'.*no item 5 in a list of 2"):
        load_config(path, ["model.experts.5.image_size=1"])
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config(path, ["train.lr"])


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["model.llm={family: qwen2, hidden_size: 64}", "data.box_format.frame=100"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.model.llm.family == "qwen2" and again.data.box_format.frame == 100


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model: expected a mapping, got list \[1\]"):
        config_from_dict({"model": [1]})
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
