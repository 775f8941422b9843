"""LoRA on the LLM (mm/lora.py): a real Trainer run with an adapter, its model directory loaded back, the
merged export, what trains and what the stage log says, exact resume, and the errors for bad settings."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import yaml
from conftest import build_tiny, tiny_run_model
from PIL import Image

from mm.build import load_vlm
from mm.config import ConfigError, load_config
from mm.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, LoraSettings, has_adapter, prepare_lora
from mm.model import VLM
from mm.optim import apply_stage, stage_summary
from mm.train import Trainer

RANK, ALPHA = 4, 8.0
STEPS = 4


def lora_config(data_dir, out, **train):
    return {
        "model": tiny_run_model(),
        "data": {"train": str(data_dir / "train.json"), "max_length": 1024, "branch_turns": True},
        "train": {
            "output_dir": str(out),
            "batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 1,
            "max_steps": STEPS,
            "save_every": 2,
            "eval_every": 0,
            "log_every": 1,
            "threads": 1,
            "mixed_precision": "no",
            "lora": {"enabled": True, "r": RANK, "alpha": ALPHA, "dropout": 0.0},
            **train,
        },
    }


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data.shapesworld import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(out, n=12, image_size=96, progress=False)
    return out


@pytest.fixture(scope="module")
def lora_run(data_dir, tmp_path_factory):
    """One LoRA run through the real Trainer: (trainer, exported dir, LLM weights before training, log)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    path = out.parent / "config.yaml"
    path.write_text(yaml.safe_dump(lora_config(data_dir, out)))
    trainer = Trainer(load_config(path), progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = Records()
    logger = logging.getLogger("mm.train")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        export = trainer.train()
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
    return trainer, export, before, records.messages


def prompts(data_dir):
    images = sorted((data_dir / "images" / "train").glob("*.png"))[:3]
    questions = ["Describe the image.", "How many shapes are there?", "What colour is the circle?"]
    return [
        ([{"from": "human", "value": f"<image>\n{q}"}], [Image.open(p).convert("RGB")])
        for q, p in zip(questions, images)
    ]


def greedy(model, proc, convs, max_new_tokens=8):
    batch = proc.collate([proc(c, i, for_generation=True) for c, i in convs], padding_side="left")
    return model.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=max_new_tokens
    )


def logits(model, proc, convs):
    batch = proc.collate([proc(c, i, for_generation=True) for c, i in convs], padding_side="left")
    with torch.no_grad():
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits


def lora_count(model) -> int:
    return sum(p.numel() for n, p in model.llm.named_parameters() if ".lora_" in n)


# -- (c) what trains -------------------------------------------------------------------------------------
def test_only_the_adapter_and_the_projector_train_and_the_base_llm_is_unchanged(lora_run):
    trainer, _, before, _ = lora_run
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if n.startswith("llm.")}
    assert trainable == adapter | {n for n, _ in model.fusion.named_parameters(prefix="fusion")}
    assert adapter and all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in adapter)
    # 2 layers x (q, k, v, o: 64 -> 64; gate, up: 64 -> 192; down: 192 -> 64), each r x (in + out)
    assert sum(model.get_parameter(n).numel() for n in adapter) == 2 * RANK * (4 * 128 + 3 * 256) == 10240
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(model.get_parameter(n)) for n in trainable}
    after = dict(model.named_parameters())
    for name, value in before.items():
        if name.startswith(("llm.", "experts.")) and name not in adapter:
            assert torch.equal(after[name], value), name
    moved = [n for n in adapter if ".lora_B." in n and not torch.equal(after[n], before[n])]
    assert len(moved) == 14 and all(before[n].abs().max() == 0 for n in moved)  # B starts at zero
    fusion = [n for n in trainable if n.startswith("fusion.")]
    assert fusion and all(not torch.equal(after[n], before[n]) for n in fusion if n.endswith("weight"))


# -- (d) the stage log -----------------------------------------------------------------------------------
def test_the_stage_log_says_what_trains_and_what_is_frozen(lora_run):
    trainer, _, _, messages = lora_run
    model = trainer.accelerator.unwrap_model(trainer.model)
    fusion = sum(p.numel() for p in model.fusion.parameters())
    expert = sum(p.numel() for p in model.experts["main"].parameters())
    base = sum(p.numel() for p in model.llm.parameters()) - 10240
    assert 1e3 <= fusion < 1e6 and 1e3 <= expert < 1e6 and 1e3 <= base < 1e6
    k = lambda n: f"{n / 1e3:.3g}K"  # noqa: E731
    line = (
        f"stage sft: training fusion ({k(fusion)}), llm LoRA r=4 (10.2K of {k(base)}); "
        f"frozen: experts.main ({k(expert)}), llm base ({k(base)})"
    )
    assert [m for m in messages if m.startswith("stage ")] == [line]


def test_stage_summary_without_lora():
    model, _ = build_tiny()
    apply_stage(model, "align", train_experts=False)
    assert re.fullmatch(
        r"stage align: training fusion \([\d.]+K\); frozen: experts\.main \([\d.]+K\), llm \([\d.]+K\)",
        stage_summary(model, "align"),
    )
    apply_stage(model, "sft", train_experts=True)
    assert re.fullmatch(
        r"stage sft: training fusion \([\d.]+K\), experts\.main \([\d.]+K\), llm \([\d.]+K\); frozen: none",
        stage_summary(model, "sft"),
    )


def test_trainer_logs_the_stage_with_lora_on_experts_training(data_dir, tmp_path, caplog):
    path = tmp_path / "config.yaml"
    config = lora_config(data_dir, tmp_path / "run", max_steps=1, save_every=0, train_experts=True)
    config["train"]["lora"]["r"] = 2
    path.write_text(yaml.safe_dump(config))
    trainer = Trainer(load_config(path), progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.counts["llm"] == lora_count(model) == 2 * 2 * (4 * 128 + 3 * 256)
    with caplog.at_level(logging.INFO, logger="mm.train"):
        trainer.train()
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage ")]
    assert re.fullmatch(
        r"stage sft: training fusion \([\d.]+K\), experts\.main \([\d.]+K\), "
        r"llm LoRA r=2 \(5\.12K of [\d.]+K\); frozen: llm base \([\d.]+K\)",
        message,
    )


# -- (a) the model directory -----------------------------------------------------------------------------
def test_lora_model_dir_is_base_plus_adapter_and_loads_to_the_same_generations(lora_run, data_dir):
    trainer, export, _, _ = lora_run
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    adapter = export / ADAPTER_DIR
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    from safetensors import safe_open

    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 28 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    assert not any("lora_" in k or "base_layer" in k for k in base_keys)
    assert "llm.model.layers.0.self_attn.q_proj.weight" in base_keys

    loaded, proc = load_vlm(export)
    assert has_adapter(loaded)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    convs = prompts(data_dir)
    torch.testing.assert_close(logits(loaded, proc, convs), logits(model, proc, convs), rtol=0, atol=0)
    ours = greedy(model, trainer.processor, convs)
    assert ours.shape[0] == 3 and ours.shape[1] >= 1
    assert torch.equal(greedy(loaded, proc, convs), ours)
    # the adapter matters: the base weights alone (the directory read as a plain VLM) answer differently
    base = VLM.from_pretrained(export).eval()
    assert not has_adapter(base)
    assert (logits(base, proc, convs) - logits(loaded, proc, convs)).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's call
def test_adapter_folder_reads_with_peft_own_loader(lora_run):
    from peft import PeftModel

    _, export, _, _ = lora_run
    ours, _ = load_vlm(export)
    plain = VLM.from_pretrained(export).eval()
    peft_llm = PeftModel.from_pretrained(plain.llm, str(export / ADAPTER_DIR)).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        want = ours.llm(input_ids=ids).logits
        got = peft_llm(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# -- (b) mm export --merge -------------------------------------------------------------------------------
def test_merged_export_loads_without_peft_and_matches_the_adapter_model(lora_run, data_dir, tmp_path, capsys):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mm.cli import main

    _, export, _, _ = lora_run
    out = tmp_path / "merged"
    assert main(["export", "--merge", str(export), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert not (out / ADAPTER_DIR).exists() and not list(tmp_path.glob("*.tmp"))
    merged, proc = load_vlm(out)
    adapted, _ = load_vlm(export)
    assert not has_adapter(merged)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    plain_keys = set(VLM.from_pretrained(export).state_dict())
    assert set(merged.state_dict()) == plain_keys
    convs = prompts(data_dir)
    want = logits(adapted, proc, convs)
    got = logits(merged, proc, convs)
    assert got.shape == want.shape and got.shape[0] == 3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(greedy(merged, proc, convs), greedy(adapted, proc, convs))
    # KV compression scores queries through the attention's q_proj: the LoRA layer there, the merged one here
    from mm.generation import GenerationSettings
    from mm.kv_cache import KVCompression

    batch = proc.collate([proc(c, i, for_generation=True) for c, i in convs], padding_side="left")
    settings = GenerationSettings(max_new_tokens=6, kv=KVCompression("lookm", 0.5))
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.equal(merged.generate(*args, settings=settings), adapted.generate(*args, settings=settings))


# -- (f) bad --merge inputs ------------------------------------------------------------------------------
def test_merge_refuses_a_directory_without_an_adapter(lora_run, tmp_path, capsys):
    from mm.cli import main

    _, export, _, _ = lora_run
    merged = tmp_path / "merged"
    assert main(["export", "--merge", str(export), str(merged)]) == 0
    capsys.readouterr()
    assert main(["export", "--merge", str(merged), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"mm export: error: {merged} has no LoRA adapter (no lora/adapter_config.json): nothing to merge; "
        "it already loads without peft"
    )
    assert main(["export", "--merge", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mm export: error: {tmp_path / 'nowhere'} is not a model directory (no config.json)"
    )
    assert main(["export", "--merge", str(export), str(export)]) == 2
    assert "needs its own directory" in capsys.readouterr().err
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["export", str(export), str(tmp_path / "y")])  # --merge is required
    assert "the following arguments are required: --merge" in capsys.readouterr().err


# -- starting from a LoRA model -------------------------------------------------------------------------
def test_init_from_a_lora_model_merges_it_and_a_resumed_run_keeps_its_adapter(lora_run, tmp_path):
    from mm.cli import main

    _, export, _, _ = lora_run
    assert main(["export", "--merge", str(export), str(tmp_path / "merged")]) == 0
    merged = load_vlm(tmp_path / "merged")[0].state_dict()
    model, _ = load_vlm(export)
    prepare_lora(model, LoraSettings(enabled=True, r=2), "sft", resumed=False)  # as with model.init_from
    state = model.state_dict()
    for name, value in merged.items():
        torch.testing.assert_close(
            state[name.replace("_proj.weight", "_proj.base_layer.weight")], value, msg=name
        )
    b = [n for n in state if ".lora_B." in n]
    assert len(b) == 14 and all(state[n].abs().max() == 0 and state[n].shape[1] == 2 for n in b)
    resumed, _ = load_vlm(export)
    with pytest.raises(ConfigError, match=r"^train.lora: the checkpoint's adapter has r=4, alpha=8.0; "):
        prepare_lora(resumed, LoraSettings(enabled=True, r=8), "sft", resumed=True)
    with pytest.raises(
        ConfigError, match=r"^train.lora.enabled: the checkpoint has a LoRA adapter; resume with"
    ):
        prepare_lora(resumed, LoraSettings(), "sft", resumed=True)
    before = {n: v.clone() for n, v in resumed.state_dict().items()}
    prepare_lora(resumed, LoraSettings(enabled=True, r=RANK, alpha=ALPHA), "sft", resumed=True)
    assert all(torch.equal(v, before[n]) for n, v in resumed.state_dict().items())


# -- resume ----------------------------------------------------------------------------------------------
def test_resume_from_a_lora_checkpoint_continues_exactly(lora_run, data_dir, tmp_path):
    trainer, export, _, _ = lora_run
    ckpt = trainer.out / "checkpoints" / "step_0000002"
    assert (ckpt / "export" / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()
    out = tmp_path / "resumed"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(lora_config(data_dir, out)))
    resumed = Trainer(load_config(path), resume_from=ckpt, progress=False)
    assert resumed.state.step == 2
    resumed.train()
    rows = lambda d: {r["step"]: r for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines())}  # noqa: E731
    want, got = rows(trainer.out), rows(out)
    assert sorted(s for s in got if "loss" in got[s]) == [3, 4]
    for step in (3, 4):
        assert got[step]["batch"] == want[step]["batch"]
        assert abs(got[step]["loss"] - want[step]["loss"]) < 1e-6, step
    a, b = load_vlm(export)[0].state_dict(), load_vlm(out / "model")[0].state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


# -- (e) settings errors ---------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a CUDA GPU")
def test_qlora_without_bitsandbytes_or_a_gpu_is_a_config_error():
    import importlib.util

    model, _ = build_tiny()
    with pytest.raises(ConfigError) as err:
        prepare_lora(model, LoraSettings(enabled=True, quantize=4), "sft", resumed=False)
    message = str(err.value)
    assert message.startswith("train.lora.quantize: QLoRA (4-bit base) needs bitsandbytes and a CUDA GPU: ")
    assert "no CUDA GPU is visible" in message
    assert ("bitsandbytes is not installed" in message) == (importlib.util.find_spec("bitsandbytes") is None)
    assert not has_adapter(model)


def test_bad_lora_settings_name_the_key():
    cases = {
        "train.lora.rank=4": "train.lora.rank: unknown key; known: "
        "alpha, dropout, enabled, quantize, r, target_modules",
        "train.lora.quantize=3": "train.lora.quantize: expected one of 4, 8, got 3",
        "train.lora.r=0": "train.lora.r: the adapter rank must be >= 1, got 0",
        "train.lora.dropout=1.5": "train.lora.dropout: must be in [0, 1), got 1.5",
        "train.lora.target_modules=[]": "train.lora.target_modules: "
        "name at least one module (e.g. q_proj) or give a regex",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert str(err.value) == message, override
    cfg = load_config(None, ["train.lora.enabled=true", r"train.lora.target_modules=.*\.(q|v)_proj"])
    assert cfg.train.lora.target_modules == r".*\.(q|v)_proj" and cfg.train.lora.r == 8
    model, _ = build_tiny()
    with pytest.raises(ConfigError, match="^train.lora.enabled: the align stage trains the projector only"):
        prepare_lora(model, cfg.train.lora, "align", resumed=False)
    with pytest.raises(ConfigError, match=r"^train.lora.target_modules: Target modules \{'qkv'\} not found"):
        prepare_lora(model, LoraSettings(enabled=True, target_modules=["qkv"]), "sft", resumed=False)
    prepare_lora(model, cfg.train.lora, "sft", resumed=False)  # the regex: q and v only
    targets = {n.split(".")[-4] for n, _ in model.llm.named_parameters() if ".lora_A." in n}
    assert targets == {"q_proj", "v_proj"}
