"""The VLM: visual experts -> projectors -> any HF causal LM, as an HF ``PreTrainedModel``.

Visual embeddings are spliced into the text embeddings at the image placeholder tokens with one batched
``masked_scatter`` (no per-sample loops, no host syncs); ``mm.positions`` assigns the (float) position ids;
the LLM always gets an explicit attention mask. Video frames (``pixel_values["video:<expert>"]``, see
``data.processor``) go through the experts in the same call as the images and are pooled by ``mm.video``
into each ``<video>``'s tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from data.processor import VIDEO_PIXELS, BranchBatch
from projectors import ProjectorConfig, build_fusion
from vision.experts import ExpertConfig, build_expert

from .llm import cache_argument
from .loss import fused_loss_terms, loss_weight, mean_loss, shifted_loss_terms
from .positions import build_position_ids, next_positions, positions_occupied, visual_offsets
from .rope import install_precise_rotary, rotary_modules
from .video import VideoPooling, pool_video, video_layout, video_tokens


def restart_positions(positions: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions of packed rows restarted at each sample: minus the position of the sample's first token.
    Exact for V2PE's rule too: a sample starts after a text token or a ceiled image, at an integer."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    previous = torch.cat([torch.full_like(segment_ids[:, :1], -1), segment_ids[:, :-1]], dim=1)
    first = torch.where(segment_ids != previous, index, torch.zeros_like(index)).cummax(dim=1).values
    return positions - positions.gather(1, first)


def segment_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The ``[B, 1, L, L]`` mask of packed rows: causal inside each sample, nothing across samples; a padding
    query sees itself only (no empty softmax rows). Boolean (``dtype`` None: SDPA, True = attend) or additive
    in ``dtype`` (eager attention adds it). HF passes a 4-D mask through unchanged."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (same & causal & (segment_ids[:, None, :] > 0)) | torch.eye(
        length, dtype=torch.bool, device=segment_ids.device
    )
    if dtype is None:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class VLMOutput(CausalLMOutputWithPast):
    """HF's causal-LM output plus ``loss_weight``: the label weight behind ``loss`` (ranks weigh their means
    by it). A field, not an attribute, so it survives accelerate's fp32 output conversion (which rebuilds
    the output from its fields)."""

    loss_weight: torch.FloatTensor | None = None


class VLMConfig(PretrainedConfig):
    """Config tree of the VLM: the LLM's own config (``text_config``), experts, fusion, positions.

    ``experts`` hold the resolved expert configs (tower defaults filled in, ``tower_config`` recorded), so the
    saved ``config.json`` alone rebuilds every tower.
    """

    model_type = "mmstack_vlm"

    def __init__(
        self,
        text_config: dict | PretrainedConfig | None = None,
        experts: list[dict] | None = None,
        projector: dict | None = None,
        image_token_id: int = 0,
        visual_delta: float = 1.0,
        visual_positions: str = "original",
        v2pe: bool = False,
        video_token_id: int | None = None,
        video: dict | None = None,
        **kwargs: Any,
    ):
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        self.text_config = text_config
        self.experts = [ExpertConfig.from_dict(e).to_dict() for e in (experts or [])]
        self.projector = asdict(ProjectorConfig.from_dict(projector or {}))
        self.image_token_id = image_token_id
        self.visual_delta = float(visual_delta)
        self.visual_positions = visual_positions
        self.v2pe = bool(v2pe)  # per-image deltas in training; rotary angles from float64 positions
        self.video_token_id = video_token_id  # None in models saved before videos (mm.build.load_vlm adds it)
        self.video = VideoPooling(**(video or {})).to_dict()  # model.video: segments, spatial pooling
        kwargs.pop("loss_weighting", None)  # a training setting in models saved before it moved to train
        super().__init__(**kwargs)

    def expert_configs(self) -> list[ExpertConfig]:
        return [ExpertConfig.from_dict(e) for e in self.experts]


# AutoTokenizer reads a model directory's config.json: an unregistered model type gets a warning every load
AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)


def _select_cache_rows(cache: DynamicCache, index: torch.Tensor, config: PretrainedConfig) -> DynamicCache:
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

    def __init__(
        self, config: VLMConfig, llm: PreTrainedModel | None = None, load_expert_weights: bool = False
    ):
        """``load_expert_weights``: read each expert's weights from its own files (``mm.build.build_vlm``);
        otherwise (``from_pretrained``) the towers are rebuilt from the config and this model's safetensors
        fill them."""
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("VLMConfig.text_config is required (the LLM's config)")
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.text_config)
        hidden = self.llm.config.hidden_size
        experts = config.expert_configs()
        if not experts:
            raise ValueError("VLMConfig.experts is empty: a VLM needs at least one visual expert")
        self.experts = nn.ModuleDict({e.name: build_expert(e, load_expert_weights) for e in experts})
        config.experts = [expert.cfg.to_dict() for expert in self.experts.values()]
        self.fusion = build_fusion(
            ProjectorConfig.from_dict(config.projector),
            {name: (ex.out_dim, ex.grid_size) for name, ex in self.experts.items()},
            hidden,
        )
        # each visual token's offset from the position before its image, in units of delta (mm.positions)
        self.visual_offsets = visual_offsets(config.visual_positions, self.fusion.layout)
        # a video: its frames pooled (mm.video) into one block of visual tokens, placed by the same scheme
        self.video_pooling = VideoPooling(**config.video)
        self.video_offsets = visual_offsets(
            config.visual_positions, video_layout(self.fusion.layout, self.video_pooling)
        )
        self._learned_positions = not rotary_modules(self.llm)
        if self._learned_positions and (config.v2pe or config.visual_delta != 1.0):
            raise ValueError(
                f"model.llm: {type(self.llm).__name__} has learned absolute position embeddings, which take "
                "integer positions only; V2PE (visual_delta != 1 or v2pe) needs a RoPE LLM (Llama, Qwen2...)"
            )
        if config.v2pe:
            self.enable_v2pe()
        # Training knobs (train.loss_weighting, train.fused_loss), set by the trainer; not saved with the
        # model. fused_loss: with labels, the LM head runs only where there are labels, chunked, and the
        # output carries no logits.
        self.loss_weighting = "token"
        self.fused_loss = False
        self.post_init()

    def enable_v2pe(self) -> None:
        """Turn V2PE on (also for a model trained without it: fine-tune a plain model with V2PE)."""
        if self._learned_positions:
            raise ValueError(f"model.llm: {type(self.llm).__name__} has learned absolute positions: no V2PE")
        install_precise_rotary(self.llm)
        self.config.v2pe = True

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
        """Visual tokens (LLM embeddings) per image: the fusion's output length."""
        return self.fusion.num_tokens

    @property
    def positions_per_image(self) -> int:
        """LLM positions one image occupies at the model's delta (fewer than its tokens when shared)."""
        return positions_occupied(self.visual_offsets, self.config.visual_delta)

    @property
    def tokens_per_video(self) -> int:
        """Visual tokens per video: ``model.video.segments`` x one frame's spatially pooled tokens
        (``mm.video.video_tokens``); a function of the config, whatever the clip."""
        return video_tokens(self.fusion.layout, self.video_pooling)

    @property
    def positions_per_video(self) -> int:
        """LLM positions one video occupies at the model's delta."""
        return positions_occupied(self.video_offsets, self.config.visual_delta)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where the visual tokens are (image and video placeholders)."""
        mask = input_ids == self.config.image_token_id
        if self.config.video_token_id is not None:
            mask = mask | (input_ids == self.config.video_token_id)
        return mask

    def run_llm(self, cache: Any = None, hidden_only: bool = False, **inputs: Any) -> CausalLMOutputWithPast:
        """The LLM's forward, with the KV cache passed under the name the installed transformers expects;
        ``hidden_only``: the decoder without the LM head (``last_hidden_state``, for the fused loss)."""
        if cache is not None:
            inputs[cache_argument(self.llm)] = cache
        if self._learned_positions and inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"].long()  # integer positions (checked at build)
        if hidden_only:
            inputs.pop("logits_to_keep", None)
            return self.llm.get_decoder()(**inputs)
        return self.llm(**inputs)

    def _loss_terms(self, out: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss terms of one ``run_llm`` output: from its logits, or fused from its hidden states."""
        if getattr(out, "logits", None) is None:
            return fused_loss_terms(
                out.last_hidden_state, self.get_output_embeddings(), labels, self.loss_weighting
            )
        return shifted_loss_terms(out.logits, labels, self.loss_weighting)

    # -- vision -------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images -> visual embeddings ``[num_images, tokens_per_image, hidden]``."""
        if isinstance(pixel_values, torch.Tensor):
            if len(self.experts) != 1:
                raise ValueError(
                    "pass pixel_values as {expert name: tensor} when the VLM has several experts"
                )
            pixel_values = {next(iter(self.experts)): pixel_values}
        dtype = next(self.fusion.parameters()).dtype  # a tower may compute in its own precision
        return self.fusion(
            {name: expert(pixel_values[name]).to(dtype) for name, expert in self.experts.items()}
        )

    def embed(
        self, input_ids: torch.Tensor, pixel_values: dict[str, torch.Tensor] | torch.Tensor | None
    ) -> torch.Tensor:
        """Text embeddings with visual embeddings scattered into the image and video placeholder positions.

        The images and every frame of every video (``video:<expert>`` entries, ``[V, F, 3, S, S]``) go
        through the experts and the fusion in one batched call; each video's frames are then pooled into its
        ``tokens_per_video`` tokens (``mm.video.pool_video``)."""
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        if isinstance(pixel_values, torch.Tensor):
            return self._scatter(embeds, input_ids, self.encode_images(pixel_values).to(embeds.dtype), None)
        images = {k: v for k, v in pixel_values.items() if not k.startswith(VIDEO_PIXELS)}
        videos = {k[len(VIDEO_PIXELS) :]: v for k, v in pixel_values.items() if k.startswith(VIDEO_PIXELS)}
        if not videos:
            return self._scatter(embeds, input_ids, self.encode_images(images).to(embeds.dtype), None)
        if self.config.video_token_id is None:
            raise ValueError("this model has no <video> token (VLMConfig.video_token_id): no videos")
        shape = next(iter(videos.values())).shape[:2]  # (videos, frames per video)
        count = next(iter(images.values())).shape[0] if images else 0
        frames = {n: v.flatten(0, 1) for n, v in videos.items()}
        both = {n: torch.cat([images[n], f]) for n, f in frames.items()} if images else frames
        visual = self.encode_images(both).to(embeds.dtype)  # images first, then the frames in order
        pooled = pool_video(visual[count:].unflatten(0, shape), self.fusion.layout, self.video_pooling)
        return self._scatter(
            embeds, input_ids, visual[:count], pooled.to(embeds.dtype)
        )  # autocast pools bf16

    def _scatter(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, images: torch.Tensor, videos: torch.Tensor | None
    ) -> torch.Tensor:
        """``embeds`` with image tokens ``[N, M, D]`` and video tokens ``[V, T, D]`` at their placeholders."""
        if images.shape[0]:
            mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, images.reshape(-1, images.shape[-1]))
        if videos is not None:
            mask = (input_ids == self.config.video_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, videos.reshape(-1, videos.shape[-1]))
        return embeds

    def position_ids_for(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start: torch.Tensor | None = None,
        image_deltas: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float64 position ids (``mm.positions``): each image or video at its delta from ``image_deltas``
        (``[B, K]``, one per visual block in placeholder order, from the processor), else at the model's
        ``visual_delta``."""
        deltas = self.config.visual_delta if image_deltas is None else image_deltas
        return build_position_ids(
            input_ids,
            attention_mask,
            self.config.image_token_id,
            self.visual_offsets,
            deltas,
            start=start,
            video_token_id=self.config.video_token_id,
            video_offsets=self.video_offsets,
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
        branches: BranchBatch | None = None,
        image_deltas: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """HF-standard forward; ``branches`` (from ``VLMProcessor.tokenize_branched``) trains single-turn
        branches that continue the rows of ``input_ids`` (see ``_forward_branches``); ``image_deltas``
        (from the processor: V2PE's per-image delta) set the positions when ``position_ids`` is not given;
        ``segment_ids`` (packed rows, ``data.packing``): positions restart and attention stays per sample."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if branches is not None:
            return self._forward_branches(
                input_ids, attention_mask, pixel_values, labels, branches, image_deltas
            )
        if position_ids is None:
            position_ids = self.position_ids_for(input_ids, attention_mask, image_deltas=image_deltas)
        embeds = self.embed(input_ids, pixel_values)
        if segment_ids is not None:
            position_ids = restart_positions(position_ids, segment_ids)
            eager = self.llm.config._attn_implementation == "eager"
            attention_mask = segment_attention_mask(segment_ids, embeds.dtype if eager else None)
        fused = self.fused_loss and labels is not None and past_key_values is None and not use_cache
        out = self.run_llm(
            cache=past_key_values,
            hidden_only=fused,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=bool(use_cache),
            **kwargs,
        )
        if labels is not None:
            terms = [self._loss_terms(out, labels)]
            kept = {} if fused else {k: v for k, v in out.items() if k != "loss"}  # fused: no logits
            return VLMOutput(loss=mean_loss(terms), loss_weight=loss_weight(terms), **kept)
        return out

    def _forward_branches(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: dict[str, torch.Tensor] | torch.Tensor | None,
        labels: torch.Tensor | None,
        branches: BranchBatch,
        image_deltas: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Prefixes once with a KV cache, then every branch as a short row continuing its record's prefix.

        The same function as running each branch as its own single-turn conversation, at a fraction of the
        cost: the image is encoded once, attention costs prefix x branch, and the LM head runs only where
        there are labels. The cache rows are gathered per branch with ``index_select``, so gradients flow back
        into the prefix. Branch rows run in length groups, each cut to its own length. Returns the loss only
        (a training path; gathering every group's logits would copy them each step).
        """
        prefix_positions = self.position_ids_for(input_ids, attention_mask, image_deltas=image_deltas)
        cache = DynamicCache(config=self.llm.config)
        prefix = self.run_llm(
            cache=cache,
            hidden_only=self.fused_loss,
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            position_ids=prefix_positions,
            use_cache=True,
            logits_to_keep=0 if labels is not None else 1,
        )
        start = next_positions(prefix_positions, attention_mask)
        terms = []
        for first, last, length in branches.groups:
            owner = branches.owner[first:last]
            ids, mask = branches.input_ids[first:last, :length], branches.attention_mask[first:last, :length]
            out = self.run_llm(
                cache=_select_cache_rows(cache, owner, self.llm.config),
                hidden_only=self.fused_loss,
                inputs_embeds=self.get_input_embeddings()(ids),
                attention_mask=torch.cat([attention_mask[owner], mask], dim=1),
                position_ids=self.position_ids_for(ids, mask, start=start[owner]),
                use_cache=True,
            )
            terms.append(self._loss_terms(out, branches.labels[first:last, :length]))
        if labels is not None:
            terms.append(self._loss_terms(prefix, labels))
        return VLMOutput(loss=mean_loss(terms), loss_weight=loss_weight(terms))

    # -- generation ---------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: dict[str, torch.Tensor] | torch.Tensor | None = None,
        image_deltas: torch.Tensor | None = None,
        streamer: Any = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        settings: Any = None,
        on_step: Any = None,
        stats: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy or sampled continuation of left-padded prompts; returns only the new tokens. ``settings``:
        a ``GenerationSettings`` or one per row (else built from ``kwargs``); ``on_step``: see
        ``mm.generation.generate``."""
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
            image_deltas=image_deltas,
            settings=settings if settings is not None else GenerationSettings(**kwargs),
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            streamer=streamer,
            on_step=on_step,
            stats=stats,
        )
