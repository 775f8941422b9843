"""LoRA (peft) on the VLM's LLM: the ``train.lora`` settings, adding / merging the adapter, and the adapter's
place in a model directory.

The adapter is injected into ``vlm.llm`` in place (``peft.inject_adapter_in_model``), not wrapped in a
``PeftModel``: the LLM keeps its class and ``forward`` signature, so ``VLM.run_llm`` (float64 position ids,
``logits_to_keep``, the KV-cache keyword), generation and KV compression run unchanged.

A LoRA model directory is a plain model directory (``model.safetensors`` holds the frozen base weights under
their usual names) plus the adapter in ``lora/`` (``adapter_config.json``, ``adapter_model.safetensors``, in
peft's layout, so ``PeftModel.from_pretrained(llm, "<model>/lora")`` also reads it). It is self-contained:
the base weights are stored, because a base built in the run (a tiny LLM, an LLM whose embeddings grew for
``<image>``) exists nowhere else. ``load_vlm`` re-applies the adapter; ``merge_export`` (``mm export
--merge``) folds it into the weights and writes a directory that loads without peft.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger("mm.train")

ADAPTER_DIR = "lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER = "default"  # peft's adapter name inside the model's parameter names
PEFT_PREFIX = "base_model.model."  # a PeftModel's key prefix: peft's own loader reads the adapter file too
LLM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_ADAPTER_NAME = re.compile(rf"\.(lora_\w+?)\.{ADAPTER}(?=\.|$)")


@dataclass
class LoraSettings:
    """``train.lora``: low-rank adapters on the LLM; its base weights stay frozen."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05
    # module names (a module whose name ends with one of them), or one regex matched against full names
    target_modules: list[str] | str = field(default_factory=lambda: list(LLM_PROJECTIONS))
    quantize: Literal[4, 8] | None = None  # QLoRA: the frozen base in 4 / 8 bit (bitsandbytes + a CUDA GPU)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: the adapter rank must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: name at least one module (e.g. q_proj) or give a regex")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules: not a regex: {self.target_modules!r} ({err})") from err

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias="none",
        )


def has_adapter(model: nn.Module) -> bool:
    """Whether the VLM's LLM carries a LoRA adapter."""
    return bool(getattr(model.llm, "peft_config", None))


def is_adapter_weight(name: str) -> bool:
    return ".lora_" in name


def adapter_rank(model: nn.Module) -> int:
    return model.llm.peft_config[ADAPTER].r


def check_quantize(settings: LoraSettings) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU; say which is missing (bitsandbytes is not a dependency)."""
    from .config import ConfigError

    if settings.quantize is None:
        return
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        raise ConfigError(
            f"train.lora.quantize: QLoRA ({settings.quantize}-bit base) needs bitsandbytes and a CUDA GPU: "
            f"{'; '.join(missing)}. Drop train.lora.quantize to train LoRA on the full-precision base."
        )


def quantize_llm(llm: nn.Module, bits: int) -> None:
    """Replace the LLM's linear layers (not the LM head) by bitsandbytes ones; moving them to the GPU
    quantizes them. peft then puts its bitsandbytes LoRA layers on top."""
    import bitsandbytes as bnb

    head = llm.get_output_embeddings()
    device = torch.device("cuda", torch.cuda.current_device())
    for name, module in list(llm.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        weight = module.weight.data.cpu()
        if bits == 4:
            layer = bnb.nn.Linear4bit(
                module.in_features, module.out_features, module.bias is not None, torch.bfloat16, "nf4"
            )
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, module.bias is not None, has_fp16_weights=False
            )
            layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent), child, layer.to(device))


def _quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def add_adapter(model: nn.Module, settings: LoraSettings) -> None:
    """Inject fresh LoRA layers into ``model.llm`` (B = 0: the model computes what it computed before)."""
    from peft import inject_adapter_in_model

    from .config import ConfigError

    check_quantize(settings)
    if settings.quantize is not None:
        quantize_llm(model.llm, settings.quantize)
    try:
        inject_adapter_in_model(settings.peft_config(), model.llm, adapter_name=ADAPTER)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model ..."
        raise ConfigError(f"train.lora.target_modules: {err}") from err


def merge_adapter(model: nn.Module) -> None:
    """Fold the adapter into the LLM's weights (W + B A * alpha / r) and remove the LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    llm = model.llm
    for name, module in list(llm.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if _quantized(module.get_base_layer()):
                raise ValueError(
                    "cannot merge into a quantized (QLoRA) base: merge its saved model directory"
                )
            module.merge(adapter_names=[ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent), child, module.get_base_layer())
    del llm.peft_config


def split_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The VLM's weights as (plain weights under their usual names, the adapter in peft's layout).

    ``state_dict``: the weights to split instead of the model's own (ZeRO-3 gathers them). A QLoRA base is
    written dequantized, so the directory loads on any machine."""
    state = model.state_dict() if state_dict is None else state_dict
    quantized = {f"llm.{name}" for name, m in model.llm.named_modules() if _quantized(m)}
    plain, adapter = {}, {}
    for key, value in state.items():
        if key.startswith("llm.") and is_adapter_weight(key):
            adapter[PEFT_PREFIX + _ADAPTER_NAME.sub(r".\1", key.removeprefix("llm."))] = value.contiguous()
        elif not any(key.startswith(q + ".") for q in quantized):
            plain[key.replace(".base_layer.", ".") if key.startswith("llm.") else key] = value
    if quantized:
        from peft.utils.integrations import dequantize_module_weight

        for name in quantized:
            module = model.get_submodule(name)
            plain_name = name.replace(".base_layer", "")
            plain[f"{plain_name}.weight"] = dequantize_module_weight(module).float().cpu()
            if module.bias is not None:
                plain[f"{plain_name}.bias"] = module.bias.detach()
    return plain, adapter


def save_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Write the adapter into ``model_dir/lora`` (``model_dir`` is save_vlm's temporary folder)."""
    from safetensors.torch import save_file

    out = Path(model_dir) / ADAPTER_DIR
    out.mkdir(parents=True, exist_ok=True)
    config = model.llm.peft_config[ADAPTER]
    config.save_pretrained(str(out))
    save_file({k: v.detach().cpu() for k, v in adapter.items()}, str(out / ADAPTER_WEIGHTS), {"format": "pt"})


def adapter_dir(model_dir: str | Path) -> Path | None:
    """``model_dir/lora`` when the directory holds an adapter."""
    path = Path(model_dir) / ADAPTER_DIR
    return path if (path / ADAPTER_CONFIG).is_file() else None


def load_adapter(model: nn.Module, model_dir: str | Path) -> bool:
    """Re-apply the adapter saved in ``model_dir/lora`` to a freshly loaded VLM; False if there is none."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from .build import ModelLoadError, check_safetensors

    path = adapter_dir(model_dir)
    if path is None:
        return False
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: missing (the weights of the adapter in {path})")
    check_safetensors(weights)
    try:
        config = LoraConfig.from_pretrained(str(path))
    except (ValueError, TypeError, OSError) as err:
        raise ModelLoadError(f"{path / ADAPTER_CONFIG}: not a LoRA adapter config ({err})") from err
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    inject_adapter_in_model(config, model.llm, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(model.llm, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if is_adapter_weight(k)]
    if result.unexpected_keys or missing:
        what = (
            f"unexpected {result.unexpected_keys[0]}" if result.unexpected_keys else f"missing {missing[0]}"
        )
        raise ModelLoadError(f"{weights}: does not fit the model's LLM ({what})")
    return True


def prepare_lora(model: nn.Module, settings: LoraSettings, stage: str, *, resumed: bool) -> None:
    """The trainer's LoRA set-up, before ``apply_stage``: a model loaded with an adapter as a starting point
    (``model.init_from``) has it merged first; a resumed run keeps its checkpoint's adapter (re-quantizing the
    base for QLoRA); otherwise a fresh adapter when ``train.lora.enabled``."""
    from .config import ConfigError

    if settings.enabled and stage != "sft":
        raise ConfigError(
            "train.lora.enabled: the align stage trains the projector only; LoRA adapts the LLM in sft"
        )
    if has_adapter(model) and not resumed:
        log.info("model.init_from holds a LoRA adapter: merged into its LLM before training")
        merge_adapter(model)
    if not settings.enabled:
        if has_adapter(model):
            raise ConfigError("train.lora.enabled: the checkpoint has a LoRA adapter; resume with it enabled")
        return
    if not has_adapter(model):
        add_adapter(model, settings)
        return
    saved = model.llm.peft_config[ADAPTER]
    if saved.r != settings.r or saved.lora_alpha != settings.alpha:
        raise ConfigError(
            f"train.lora: the checkpoint's adapter has r={saved.r}, alpha={saved.lora_alpha}; the config "
            f"asks for r={settings.r}, alpha={settings.alpha}"
        )
    if settings.quantize is not None:  # the checkpoint's export holds a dequantized base: quantize it again
        from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

        check_quantize(settings)
        state = get_peft_model_state_dict(model.llm, adapter_name=ADAPTER)
        _unload(model)
        quantize_llm(model.llm, settings.quantize)
        inject_adapter_in_model(saved, model.llm, adapter_name=ADAPTER)
        set_peft_model_state_dict(model.llm, state, adapter_name=ADAPTER)


def _unload(model: nn.Module) -> None:
    """Remove the LoRA layers without merging them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.llm.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.llm.get_submodule(parent), child, module.get_base_layer())
    del model.llm.peft_config


def merge_export(model_dir: str | Path, out_dir: str | Path) -> Path:
    """``mm export --merge``: the LoRA model at ``model_dir`` with its adapter merged, written to ``out_dir``
    as a plain model directory (loads without peft), atomically."""
    from .build import load_vlm, save_vlm

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    if adapter_dir(model_dir) is None:
        raise ValueError(
            f"{model_dir} has no LoRA adapter (no {ADAPTER_DIR}/{ADAPTER_CONFIG}): nothing to merge; "
            "it already loads without peft"
        )
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{out_dir}: the merged model needs its own directory, not the LoRA model's")
    model, processor = load_vlm(model_dir)
    merge_adapter(model)
    return save_vlm(model, processor, out_dir)
