"""A VLM over three experts of three kinds: trains, saves, reloads without the experts' files, generates."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch
from conftest import CORPUS, TINY_LLM, make_hf_clip_dir, solid_image, tiny_model_section
from safetensors.torch import load_file, save_file

from mm.build import build_tokenizer, build_vlm, load_vlm, make_processor, save_vlm

CSWIN_KWARGS = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 4]}
CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
]


def three_experts(tmp_path, projector, visual_positions="original"):
    """timm CNN (weights from a local file) + our CSWin (timm) + an HF CLIP tower (a local directory)."""
    torch.manual_seed(0)
    cnn_file = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), cnn_file)
    clip_dir = make_hf_clip_dir(tmp_path / "clip", image_size=32)
    experts = [
        {
            "name": "cnn",
            "model": "resnet10t",
            "pretrained": str(cnn_file),
            "image_size": 64,
            "feature_index": 2,
        },
        {
            "name": "cswin",
            "model": "cswin_tiny_224",
            "image_size": 64,
            "feature_index": 1,
            "model_kwargs": CSWIN_KWARGS,
        },
        {"name": "clip", "kind": "hf", "model": str(clip_dir), "frozen": True},
    ]
    section = tiny_model_section(
        llm=dict(TINY_LLM), experts=experts, projector=projector, visual_positions=visual_positions
    )
    tokenizer = build_tokenizer(section, CORPUS)
    model = build_vlm(section, tokenizer)
    return model, make_processor(model, tokenizer), [cnn_file, clip_dir]


def test_the_expert_files_are_read_when_built(tmp_path):
    model, _, (cnn_file, _) = three_experts(tmp_path, {"type": "concat", "pool": 2})
    saved = load_file(cnn_file)
    loaded = model.experts["cnn"].model.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], saved["conv1.0.weight"])


@pytest.mark.parametrize(
    ("projector", "positions", "tokens", "occupied"),
    [
        # 8x8 cnn, 8x8 cswin, 4x4 clip; pool 2 on the first two: 16 + 16 + 16 tokens
        ({"type": "concat", "pool": 2, "experts": {"clip": {"pool": 1}}}, "original", 48, 48),
        ({"type": "concat", "pool": 2, "experts": {"clip": {"pool": 1}}}, "share_by_row", 48, 12),
        ({"type": "channel_concat", "pos_embed": True}, "share_all", 16, 1),
        ({"type": "resampler", "grid": [3, 3], "heads": 2}, "original", 9, 9),
    ],
)
def test_three_kinds_train_save_reload_without_their_files_and_generate_the_same(
    tmp_path, projector, positions, tokens, occupied
):
    model, proc, files = three_experts(tmp_path, projector, positions)
    assert model.tokens_per_image == proc.tokens_per_image == tokens
    assert proc.positions_per_image == occupied
    clip = model.experts["clip"]
    before = {k: v.clone() for k, v in clip.state_dict().items()}

    model.train()
    batch = proc.collate([proc(CONV, [solid_image()]), proc(CONV, [solid_image((0, 0, 255), (40, 70))])])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(**batch).loss
    loss.backward()
    assert all(p.grad is None for p in clip.parameters())  # frozen: no gradients
    assert next(model.experts["cswin"].model.parameters()).grad.abs().sum() > 0
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in clip.state_dict().items())
    assert not clip.model.training  # frozen experts stay in eval mode
    model.eval()

    prompt = proc([CONV[0]], [solid_image((0, 200, 0))], for_generation=True)
    batch = proc.collate([prompt], padding_side="left")
    settings = dict(max_new_tokens=5, eos_token_id=-1)
    expected = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, **settings)
    with torch.no_grad():
        expected_loss = model(**proc.collate([proc(CONV, [solid_image()])])).loss

    out = save_vlm(model, proc, tmp_path / "vlm")
    for f in files:  # the experts' own files are gone: the VLM's safetensors hold their weights
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    reloaded, reproc = load_vlm(out)
    assert reproc.visual_offsets == proc.visual_offsets
    assert reloaded.experts["clip"].cfg.resize == "crop"  # resolved preprocessing was saved
    batch = reproc.collate(
        [reproc([CONV[0]], [solid_image((0, 200, 0))], for_generation=True)], padding_side="left"
    )
    again = reloaded.generate(**{k: v for k, v in batch.items() if k != "labels"}, **settings)
    assert torch.equal(again, expected) and again.shape == (1, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**reproc.collate([reproc(CONV, [solid_image()])])).loss, expected_loss
        )


def test_a_model_directory_from_before_the_fusion_registry_still_loads(tmp_path):
    """Older directories kept one MLP per expert under ``projectors.`` with projector type ``mlp``."""
    import json

    section = tiny_model_section()
    torch.manual_seed(2)
    tokenizer = build_tokenizer(section, CORPUS)
    model = build_vlm(section, tokenizer).eval()
    proc = make_processor(model, tokenizer)
    out = save_vlm(model, proc, tmp_path / "new")
    weights = out / "model.safetensors"
    state = load_file(weights)
    old = {k.replace("fusion.projectors.", "projectors.", 1): v for k, v in state.items()}
    assert any(k.startswith("projectors.main.") for k in old)
    save_file(old, weights, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["projector"] = {"type": "mlp", "depth": 2, "hidden_dim": None, "pool": 2, "pos_embed": True}
    (out / "config.json").write_text(json.dumps(config))
    settings = json.loads((out / "mm_processor.json").read_text())
    settings.pop("visual_offsets"), settings.pop("delta")
    (out / "mm_processor.json").write_text(json.dumps(settings))

    reloaded, reproc = load_vlm(out)
    batch = proc.collate([proc(CONV, [solid_image()])])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).loss, model(**batch).loss)
    assert reproc.visual_offsets == list(range(1, proc.tokens_per_image + 1))


def test_a_saved_multi_expert_model_loads_quietly_in_bf16_and_generates(tmp_path, capfd):
    model, proc, _ = three_experts(tmp_path, {"type": "concat", "pool": 2, "experts": {"clip": {"pool": 1}}})
    out = save_vlm(model.eval(), proc, tmp_path / "vlm")
    capfd.readouterr()
    reloaded, reproc = load_vlm(out, dtype=torch.bfloat16)
    assert "You are using a model of type" not in capfd.readouterr().err  # no warning on every load
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    batch = reproc.collate([reproc([CONV[0]], [solid_image()], for_generation=True)], padding_side="left")
    batch.pop("labels")
    assert reloaded.generate(**batch, max_new_tokens=3, eos_token_id=-1).shape == (1, 3)
