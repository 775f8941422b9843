"""Visual experts of every kind: local files, declared grids, readouts, preprocessing, freezing."""

from __future__ import annotations

import pytest
import torch
from conftest import CLIP_MEAN, make_hf_clip_dir, make_open_clip_dir
from PIL import Image

from vision.experts import EXPERT_KINDS, ExpertConfig, Preprocessing, build_expert
from vision.experts.hf_expert import _encoder_layers

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def image_from_columns(colours, height):
    """An image whose column x has colour ``colours[x]``."""
    im = Image.new("RGB", (len(colours), height))
    im.putdata([colours[x] for _ in range(height) for x in range(len(colours))])
    return im


def image_from_rows(colours, width):
    im = Image.new("RGB", (width, len(colours)))
    im.putdata([colours[y] for y in range(len(colours)) for _ in range(width)])
    return im


def pixel_rows(t: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """``uint8 [3, H, W]`` -> rows of RGB tuples, for exact comparisons with hand-made expectations."""
    return [[tuple(int(v) for v in t[:, y, x]) for x in range(t.shape[2])] for y in range(t.shape[1])]


# -- preprocessing ---------------------------------------------------------------------------------
def test_pad_mode_pads_to_a_square_with_the_mean_colour_like_llava():
    # 4 wide, 2 high, all red: padded to 4x4 with one mean-coloured row above and below, then "resized" 4->4
    pre = Preprocessing(size=4, resize="pad", mean=tuple(CLIP_MEAN))
    out = pre([Image.new("RGB", (4, 2), RED)])
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 4, 4)
    mean = (122, 116, 104)  # int(x * 255) of CLIP's mean, as LLaVA's expand2square fills
    assert pre.pad_colour() == mean
    assert pixel_rows(out[0]) == [[mean] * 4, [RED] * 4, [RED] * 4, [mean] * 4]
    # a tall image pads left and right
    tall = pixel_rows(pre([Image.new("RGB", (2, 4), BLUE)])[0])
    assert all(row == [mean, BLUE, BLUE, mean] for row in tall)


def test_crop_mode_takes_the_centre_after_the_shortest_side():
    # 8 wide, 4 high: the shortest side is already 4, so the crop keeps columns 2..5
    cols = [RED, RED, GREEN, GREEN, BLUE, BLUE, WHITE, WHITE]
    out = Preprocessing(size=4, resize="crop")([image_from_columns(cols, 4)])
    assert pixel_rows(out[0]) == [[GREEN, GREEN, BLUE, BLUE]] * 4


def test_squash_mode_keeps_everything_and_stretches():
    # 8 wide, 4 high, each row one colour: squashed to 4x4 every row keeps its colour (nothing cut)
    rows = [RED, GREEN, BLUE, WHITE]
    out = Preprocessing(size=4, resize="squash")([image_from_rows(rows, 8)])
    assert pixel_rows(out[0]) == [[c] * 4 for c in rows]
    # the crop of the same image would also keep all rows, but pad would add mean rows: the modes differ
    padded = Preprocessing(size=4, resize="pad")([image_from_rows(rows, 8)])
    assert pixel_rows(padded[0]) != pixel_rows(out[0])


def test_bad_preprocessing_settings_are_named():
    with pytest.raises(ValueError, match="resize: unknown mode 'stretch'"):
        Preprocessing(size=4, resize="stretch")
    with pytest.raises(ValueError, match="interpolation: unknown 'lanczos'"):
        Preprocessing(size=4, interpolation="lanczos")


# -- timm ------------------------------------------------------------------------------------------
def test_registry_lists_the_three_kinds():
    assert set(EXPERT_KINDS) == {"timm", "open_clip", "hf"}
    with pytest.raises(ValueError, match="kind: unknown expert kind 'clip'; known: timm, open_clip, hf"):
        ExpertConfig(kind="clip")


@pytest.mark.parametrize(
    ("cfg", "grid", "channels"),
    [
        (dict(model="resnet10t", image_size=64, feature_index=2), (8, 8), 128),
        # a ViT read at a chosen block: 32 px / patch 16 = 2x2 tokens of width 192, class token dropped
        (
            dict(model="vit_tiny_patch16_224", model_kwargs=dict(img_size=32, depth=3), feature_index=1),
            (2, 2),
            192,
        ),
        # our CSWin (registered with timm), stage 1 (stride 8)
        (
            dict(
                model="cswin_tiny_224",
                image_size=64,
                feature_index=1,
                model_kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 4]),
            ),
            (8, 8),
            32,
        ),
    ],
)
def test_timm_experts_give_the_grid_and_channels_they_declare(cfg, grid, channels):
    expert = build_expert(dict(name="x", **cfg))
    assert expert.grid_size == grid and expert.out_dim == channels
    size = expert.cfg.image_size
    tokens = expert(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    assert tokens.shape == (2, grid[0] * grid[1], channels) and torch.isfinite(tokens).all()


def test_timm_vit_block_readout_is_that_blocks_output():
    import timm

    torch.manual_seed(0)
    expert = build_expert(
        dict(
            name="vit", model="vit_tiny_patch16_224", model_kwargs=dict(img_size=32, depth=3), feature_index=1
        )
    )
    full = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=0)
    full.load_state_dict(expert.model.state_dict(), strict=False)  # blocks after 1 were pruned
    x = torch.rand(1, 3, 32, 32)
    ref = full.forward_intermediates((x - expert.mean) / expert.std, indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(expert(x), ref.flatten(2).transpose(1, 2))
    assert len(expert.model.blocks) == 2  # later blocks cost nothing


def test_frozen_expert_gets_no_gradients_and_stays_in_eval_mode():
    expert = build_expert(dict(name="f", model="resnet10t", image_size=32, feature_index=2, frozen=True))
    expert.train()
    assert not expert.model.training  # BatchNorm statistics stay put
    expert.requires_grad_(True)  # what a training stage asks for
    assert not any(p.requires_grad for p in expert.parameters())
    out = expert(torch.rand(2, 3, 32, 32))
    assert not out.requires_grad
    trainable = build_expert(dict(name="t", model="resnet10t", image_size=32, feature_index=2))
    trainable.train()
    assert trainable.model.training and trainable(torch.rand(2, 3, 32, 32)).requires_grad


@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_expert_checkpointing_recomputes_blocks_and_keeps_gradients(tmp_path, kind):
    """train.gradient_checkpointing on a trainable tower: each block runs again in the backward (counted
    with a hook), with the same gradients."""
    if kind == "timm":
        spec = dict(name="v", model="vit_tiny_patch16_224", model_kwargs=dict(img_size=32, depth=3))
    else:
        spec = dict(name="v", kind="hf", model=str(make_hf_clip_dir(tmp_path / "clip")))
    torch.manual_seed(0)
    expert = build_expert(spec).train()
    block = expert.model.blocks[0] if kind == "timm" else _encoder_layers(expert.model)[0]
    calls = []
    # a pre-hook inside the block: HF checkpoints forward (the block's own hooks run once) and recomputation
    # may stop early, once the tensors it needs exist again
    block.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    grads = []
    for on in (False, True):
        assert expert.set_checkpointing(on)
        calls.clear()
        expert.zero_grad()
        expert(x).square().mean().backward()
        assert len(calls) == (2 if on else 1)
        grads.append({n: p.grad.clone() for n, p in expert.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


# -- hf --------------------------------------------------------------------------------------------
def test_hf_clip_expert_reads_the_penultimate_layer_llava_style(tmp_path):
    from transformers import CLIPModel

    directory = make_hf_clip_dir(tmp_path / "clip")
    expert = build_expert(dict(name="clip", kind="hf", model=str(directory)))
    cfg = expert.cfg
    # preprocessing read from the directory's image-processor config
    assert (cfg.image_size, cfg.resize, cfg.interpolation) == (32, "crop", "bicubic")
    assert cfg.mean == pytest.approx(tuple(CLIP_MEAN)) and cfg.feature_index == -2
    assert expert.grid_size == (4, 4) and expert.out_dim == 32
    x = torch.rand(2, 3, 32, 32)
    reference = CLIPModel.from_pretrained(directory).vision_model
    hidden = reference(pixel_values=(x - expert.mean) / expert.std, output_hidden_states=True).hidden_states
    tokens = expert(x)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, hidden[-2][:, 1:])  # penultimate layer, CLS dropped
    assert expert.cfg.tower_config["model_type"] == "clip_vision_model"


@pytest.mark.parametrize("family", ["siglip", "dinov2_registers"])
def test_hf_siglip_and_dinov2_towers_drop_their_prefix_tokens(tmp_path, family):
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(1)
    tiny = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32
    )
    if family == "siglip":
        tower, prefix = SiglipVisionModel(SiglipVisionConfig(patch_size=8, **tiny)), 0
    else:
        tower = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(patch_size=8, num_register_tokens=4, **tiny)
        )
        prefix = 5  # CLS + 4 registers
    tower.save_pretrained(tmp_path / family)
    expert = build_expert(dict(name=family, kind="hf", model=str(tmp_path / family), feature_index=-1))
    assert expert.grid_size == (4, 4) and expert.cfg.resize == "squash"  # no preprocessor config: squash
    x = torch.rand(1, 3, 32, 32)
    hidden = tower(pixel_values=(x - expert.mean) / expert.std, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape[1] == 16 + prefix
    torch.testing.assert_close(expert(x), hidden[:, prefix:])


def test_hf_expert_rebuilds_from_its_saved_config_without_the_directory(tmp_path):
    import shutil

    directory = make_hf_clip_dir(tmp_path / "clip")
    expert = build_expert(dict(name="clip", kind="hf", model=str(directory)))
    shutil.rmtree(directory)
    rebuilt = build_expert(expert.cfg.to_dict(), load_weights=False)
    rebuilt.load_state_dict(expert.state_dict())
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), expert(x))
    with pytest.raises(FileNotFoundError, match="is not a local HF model directory"):
        build_expert(dict(name="clip", kind="hf", model=str(directory)))


# -- open_clip -------------------------------------------------------------------------------------
def test_open_clip_expert_from_a_local_dir_and_from_an_architecture_file(tmp_path):
    from open_clip.model import CLIP

    directory, model_cfg = make_open_clip_dir(tmp_path / "oc")
    expert = build_expert(dict(name="oc", kind="open_clip", model=f"local-dir:{directory}"))
    assert expert.grid_size == (4, 4) and expert.out_dim == 32
    assert expert.cfg.resize == "pad" and expert.cfg.mean == (0.5, 0.5, 0.5)  # open_clip's "longest" = pad
    reference = CLIP(**model_cfg)
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(directory / "open_clip_model.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    ref = reference.visual.forward_intermediates(
        (x - 0.5) / 0.5, indices=[1], intermediates_only=True, output_fmt="NLC"
    )["image_intermediates"][0]
    torch.testing.assert_close(expert(x), ref)  # block 1 of 3 (the penultimate), class token dropped
    assert not hasattr(expert.model, "text") and len(expert.model.transformer.resblocks) == 2

    # by architecture name + a local weights file: ViT-B-32 is too big for a unit test, so register ours
    import open_clip

    open_clip.factory._MODEL_CONFIGS["mmstack-tiny-test"] = model_cfg
    by_name = build_expert(
        dict(
            name="oc",
            kind="open_clip",
            model="mmstack-tiny-test",
            pretrained=str(directory / "open_clip_model.safetensors"),
        )
    )
    assert by_name.cfg.resize == "crop" and by_name.cfg.interpolation == "bicubic"  # open_clip defaults
    by_name.load_state_dict(expert.state_dict())  # same architecture, same keys
    with pytest.raises(ValueError, match="takes image_size 32, got 64"):
        build_expert(dict(name="oc", kind="open_clip", model=f"local-dir:{directory}", image_size=64))
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Nope'"):
        build_expert(dict(name="oc", kind="open_clip", model="ViT-Nope"))


def test_per_expert_learning_rates_reach_the_optimiser():
    from conftest import TINY_LLM, tiny_model_section

    from mm.build import build_tokenizer, build_vlm
    from mm.config import RunConfig
    from mm.optim import apply_stage, param_groups

    section = tiny_model_section(
        llm=dict(TINY_LLM),
        experts=[
            dict(name="fast", model="resnet10t", image_size=32, feature_index=2, lr=0.5),
            dict(name="slow", model="resnet10t", image_size=32, feature_index=2),
            dict(name="still", model="resnet10t", image_size=32, feature_index=2, frozen=True),
        ],
        projector={"type": "concat"},
    )
    from conftest import CORPUS

    model = build_vlm(section, build_tokenizer(section, CORPUS))
    cfg = RunConfig(model=section)
    cfg.train.lr, cfg.train.expert_lr = 1e-3, 1e-4
    counts = apply_stage(model, "sft", train_experts=True)
    lrs = {g["name"]: g["lr"] for g in param_groups(model, cfg)}
    assert lrs == {"llm": 1e-3, "fusion": 1e-3, "experts.fast": 0.5, "experts.slow": 1e-4}
    still = sum(p.numel() for p in model.experts["still"].parameters())
    total = sum(p.numel() for p in model.experts.parameters())
    assert counts["experts"] == total - still
