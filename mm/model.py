"""The VLM: visual experts -> projectors -> any HF causal LM, as an HF ``PreTrainedModel``.

Visual embeddings are spliced into the text embeddings at the image placeholder tokens with one batched
``masked_scatter`` (no per-sample loops, no host syncs); ``mm.positions`` assigns the (float) position ids;
the LLM always gets an explicit attention mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from projectors import build_projector
from vision.experts import ExpertConfig, VisualExpert

from .positions import branch_attention_mask as packed_branch_mask
from .positions import branch_position_ids, build_position_ids, next_positions


class VLMConfig(PretrainedConfig):
    """Config tree of the VLM: the LLM's own config (``text_config``), experts, projector, positions."""

    model_type = "mmstack_vlm"

    def __init__(
        self,
        text_config: dict | PretrainedConfig | None = None,
        experts: list[dict] | None = None,
        projector: dict | None = None,
        image_token_id: int = 0,
        visual_delta: float = 1.0,
        loss_weighting: str = "token",
        **kwargs: Any,
    ):
        if loss_weighting not in ("token", "answer"):
            raise ValueError(f"loss_weighting must be 'token' or 'answer', got {loss_weighting!r}")
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        self.text_config = text_config
        self.experts = [ExpertConfig.from_dict(e).to_dict() for e in (experts or [])]
        self.projector = dict(projector or {"type": "mlp", "depth": 2})
        self.image_token_id = image_token_id
        self.visual_delta = float(visual_delta)
        self.loss_weighting = loss_weighting  # "answer": every answer weighs the same in the loss
        super().__init__(**kwargs)

    def expert_configs(self) -> list[ExpertConfig]:
        return [ExpertConfig.from_dict(e) for e in self.experts]


def shifted_loss_terms(
    logits: torch.Tensor, labels: torch.Tensor, weighting: str = "token"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy as (weighted sum, total weight), so several row groups can share one mean.

    ``"token"``: every labelled token weighs 1 (HF's mean). ``"answer"``: every answer (a run of labelled
    tokens) weighs the same, each of its n tokens 1/n, so long answers (captions, boxes) do not drown one-word
    answers. Vectorised: run ids come from a cumulative sum over run starts.
    """
    targets = labels[:, 1:]
    valid = targets != -100
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten().clamp_min(0), reduction="none"
    ).view_as(targets)
    if weighting == "token":
        weights = valid.float()
    else:
        starts = valid & ~torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
        run_id = torch.cumsum(starts.flatten().long(), 0).view_as(valid) * valid  # 0: unlabelled
        counts = torch.zeros(int(run_id.numel()) + 1, device=labels.device).scatter_add_(
            0, run_id.flatten(), valid.flatten().float()
        )
        weights = torch.where(valid, 1.0 / counts[run_id].clamp_min(1.0), torch.zeros_like(ce))
    return (ce * weights).sum(), weights.sum()


def _mean_loss(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One mean over several (weighted sum, weight) terms from ``shifted_loss_terms``."""
    return sum(t for t, _ in terms) / sum(w for _, w in terms).clamp_min(1e-9)


def answer_weighted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy where every answer weighs the same (see ``shifted_loss_terms``)."""
    return _mean_loss([shifted_loss_terms(logits, labels, "answer")])


def _select_cache_rows(cache: Any, index: torch.Tensor, config: PretrainedConfig) -> DynamicCache:
    """A new KV cache holding rows ``index`` of ``cache`` (differentiable ``index_select``, per layer)."""
    selected = DynamicCache(config=config)
    for layer, source in zip(selected.layers, cache.layers):
        layer.update(source.keys.index_select(0, index), source.values.index_select(0, index))
    return selected


class VLM(PreTrainedModel):
    config_class = VLMConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules: list[str] = []

    def __init__(self, config: VLMConfig, llm: PreTrainedModel | None = None):
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("VLMConfig.text_config is required (the LLM's config)")
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.text_config)
        hidden = self.llm.config.hidden_size
        experts = config.expert_configs()
        if not experts:
            raise ValueError("VLMConfig.experts is empty: a VLM needs at least one visual expert")
        self.experts = nn.ModuleDict({e.name: VisualExpert(e) for e in experts})
        proj = dict(config.projector)
        kind = proj.pop("type", "mlp")
        self.projectors = nn.ModuleDict(
            {
                name: build_projector(kind, ex.out_dim, hidden, grid=ex.grid_size, **proj)
                for name, ex in self.experts.items()
            }
        )
        self.post_init()

    # -- HF plumbing ---------------------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        # Sub-modules initialise themselves (the LLM via its own config, experts via timm, projectors via
        # PyTorch defaults); re-initialising here would clobber loaded expert weights.
        return

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    @property
    def tokens_per_image(self) -> int:
        """LLM positions one image occupies (sum over experts of each projector's output length)."""
        return sum(self.projectors[n].output_length(e.num_tokens) for n, e in self.experts.items())

    # -- vision -------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images -> visual embeddings ``[num_images, tokens_per_image, hidden]``."""
        if isinstance(pixel_values, torch.Tensor):
            if len(self.experts) != 1:
                raise ValueError(
                    "pass pixel_values as {expert name: tensor} when the VLM has several experts"
                )
            pixel_values = {next(iter(self.experts)): pixel_values}
        parts = [self.projectors[name](expert(pixel_values[name])) for name, expert in self.experts.items()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: dict[str, torch.Tensor] | torch.Tensor | None
    ) -> torch.Tensor:
        """Text embeddings with visual embeddings scattered into the image placeholder positions."""
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        visual = self.encode_images(pixel_values).to(embeds.dtype)
        mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(mask, visual.reshape(-1, visual.shape[-1]))

    def position_ids_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return build_position_ids(
            input_ids, attention_mask, self.config.image_token_id, self.config.visual_delta
        )

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: dict[str, torch.Tensor] | torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        segment_ids: torch.Tensor | None = None,
        branch_input_ids: torch.Tensor | None = None,
        branch_attention_mask: torch.Tensor | None = None,
        branch_labels: torch.Tensor | None = None,
        branch_owner: torch.Tensor | None = None,
        branch_groups: list[tuple[int, int, int]] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Training with single-turn branches on a shared prefix (``VLMProcessor.tokenize_branched``) comes
        in two equivalent layouts: packed rows with ``segment_ids`` (the LLM gets a 4-D mask and per-branch
        positions), or prefix rows + ``branch_*`` rows (``VLMProcessor.split_branches``; see
        ``_forward_branches``)."""
        if branch_input_ids is not None:
            return self._forward_branches(
                input_ids,
                attention_mask,
                pixel_values,
                labels,
                branch_input_ids,
                branch_attention_mask,
                branch_labels,
                branch_owner,
                branch_groups,
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if segment_ids is not None:
            if position_ids is None:
                position_ids = branch_position_ids(
                    input_ids,
                    attention_mask,
                    segment_ids,
                    self.config.image_token_id,
                    self.config.visual_delta,
                )
            attention_mask = packed_branch_mask(attention_mask, segment_ids)
            if self.llm.config._attn_implementation == "eager":
                attention_mask = torch.zeros(
                    attention_mask.shape, dtype=self.dtype, device=input_ids.device
                ).masked_fill(~attention_mask, torch.finfo(self.dtype).min)
        if position_ids is None:
            position_ids = self.position_ids_for(input_ids, attention_mask)
        out = self.llm(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache if use_cache is not None else False,
            **kwargs,
        )
        if labels is not None:
            out.loss = _mean_loss([shifted_loss_terms(out.logits, labels, self.config.loss_weighting)])
        return out

    def _forward_branches(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: dict[str, torch.Tensor] | torch.Tensor | None,
        labels: torch.Tensor | None,
        branch_input_ids: torch.Tensor,
        branch_attention_mask: torch.Tensor,
        branch_labels: torch.Tensor | None,
        branch_owner: torch.Tensor,
        branch_groups: list[tuple[int, int, int]] | None = None,
    ) -> CausalLMOutputWithPast:
        """Prefixes once with a KV cache, then every branch as a short row continuing its record's prefix.

        Same function as the packed 4-D mask, at a fraction of the attention cost (prefix x branch instead
        of the packed length squared), and the LM head runs only where there are labels. The cache rows are
        gathered per branch with ``index_select``, so gradients flow back into the prefix. Branch rows run
        in length groups (``(start, end, length)`` from the collator), each cut to its own length. Returns
        the loss only (a training path).
        """
        cfg = self.config
        prefix_positions = self.position_ids_for(input_ids, attention_mask)
        prefix = self.llm(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            position_ids=prefix_positions,
            use_cache=True,
            logits_to_keep=0 if labels is not None else 1,
        )
        start = next_positions(prefix_positions, attention_mask)
        groups = branch_groups or [(0, branch_input_ids.shape[0], branch_input_ids.shape[1])]
        terms = []
        for first, last, length in groups:
            owner = branch_owner[first:last]
            ids, mask = branch_input_ids[first:last, :length], branch_attention_mask[first:last, :length]
            out = self.llm(
                inputs_embeds=self.get_input_embeddings()(ids),
                attention_mask=torch.cat([attention_mask[owner], mask], dim=1),
                position_ids=build_position_ids(
                    ids, mask, cfg.image_token_id, cfg.visual_delta, start=start[owner]
                ),
                past_key_values=_select_cache_rows(prefix.past_key_values, owner, self.llm.config),
                use_cache=True,
            )
            if branch_labels is not None:
                group_labels = branch_labels[first:last, :length]
                terms.append(shifted_loss_terms(out.logits, group_labels, cfg.loss_weighting))
        if terms and labels is not None:
            terms.append(shifted_loss_terms(prefix.logits, labels, cfg.loss_weighting))
        # training only: the loss, no logits (gathering every group's logits would copy them each step)
        return CausalLMOutputWithPast(loss=_mean_loss(terms) if terms else None)

    # -- generation ---------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: dict[str, torch.Tensor] | torch.Tensor | None = None,
        streamer: Any = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **settings: Any,
    ) -> torch.Tensor:
        """Greedy or sampled continuation of left-padded prompts; returns only the new tokens."""
        from .generation import GenerationSettings, generate

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        gen_cfg = getattr(self.llm, "generation_config", None)
        if eos_token_id is None and gen_cfg is not None:
            eos_token_id = gen_cfg.eos_token_id
        if pad_token_id is None:
            pad_token_id = self.llm.config.pad_token_id if self.llm.config.pad_token_id is not None else 0
        return generate(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            settings=GenerationSettings(**settings),
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            streamer=streamer,
        )
