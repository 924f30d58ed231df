"""Qwen2-VL on megatron-core, one pipeline stage of it.

    stage 0:     vision_encoder -> vision_projector -> image and video features
                 (pixel_values [n_image_patches, 1176] and pixel_values_videos
                 [n_video_patches, 1176] in one ViT call: features [n_patches / merge**2, h])
                 language_model.embedding (+ image features at <|image_pad|>,
                 video features at <|video_pad|>) -> its LLM layers
    stage k:     LLM layers (hidden states [s, b, h] from the previous stage via set_input_tensor)
    last stage:  final norm -> output layer -> logits [b, s, V/TP] (padded columns -inf)
                 or, with labels, per-token cross-entropy [b, s]

Every stage receives input_ids, position_ids and attention_mask (and the
image_grid_thw [n_img, 3] / video_grid_thw [n_vid, 3] of the batch); when
position_ids is None it computes the M-RoPE positions itself from them (the
same rule on every stage).  Parameter names are the mapping table's
(models/qwen2vl/mapping.py).
"""
from typing import Mapping, Optional

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.lora import ADAPTER
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from mindspeed_mm.models.language_model import Qwen2LanguageModel, check_vision_tokens
from mindspeed_mm.models.parallel import ParallelSettings
from mindspeed_mm.models.qwen2vl.mapping import MAPPING
from mindspeed_mm.models.qwen2vl.projector import VisionProjector
from mindspeed_mm.models.rope_index import get_rope_index
from mindspeed_mm.models.sharding import shard_state
from mindspeed_mm.models.qwen2vl.vision_encoder import VisionEncoder, vision_transformer_config
from mindspeed_mm.models.transformer_configs import language_transformer_config


def padding_to_megatron_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """HF [b, s] (1 = token, 0 = pad) -> megatron bool [b, 1, 1, s] (True = masked key) for the causal LLM.

    None when no real token can see a pad: no padding, or right padding only (every row ones, then
    zeros), where the causal mask already hides the pads; only the pads' own outputs, which nothing
    uses, differ.  Training batches are right-padded, so they keep the fast causal kernels.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    if bool((keep[:, 1:] <= keep[:, :-1]).all()):
        return None
    return ~keep[:, None, None, :]


def packed_sequences(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """megatron's packed-sequence parameters for one row of several sequences.

    The layout stays 'sbhd' ([s, 1, heads, dim]), not 'thd': megatron's thd path would rotate each
    sequence with positions 0..n-1 of a 1-D rope, while M-RoPE needs the (t, h, w) positions given.
    CoreAttention (platform/attention.py) reads cu_seqlens and attends within each sequence.
    """
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)


class Qwen2VLModel(MegatronModule):
    """One pipeline stage of Qwen2-VL (the whole model when pre_process and post_process).

    A family on the same decoder (models/qwen2_5_vl) subclasses it: its own ``mapping``, ``build_vision``
    and ``rope_positions``; the LLM, the feature injection and the pipeline hooks stay these."""

    mapping = MAPPING  # the family's weight table (load_full_state)

    def __init__(self, cfg: Qwen2VLConfig, parallel: Optional[ParallelSettings] = None,
                 pre_process: bool = True, post_process: bool = True, **parallel_kwargs):
        parallel = parallel if parallel is not None else ParallelSettings(**parallel_kwargs)
        cfg.validate()
        cfg.check_parallel(parallel.tensor_parallel)
        config = language_transformer_config(cfg, parallel)
        super().__init__(config=config)
        self.cfg, self.parallel = cfg, parallel
        self.stage_layers = parallel.resolved_stage_layers(cfg.text.num_layers)
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # megatron's schedules ask for it
        if pre_process:
            self.vision_encoder, self.vision_projector = self.build_vision(cfg, parallel)
        self.language_model = Qwen2LanguageModel(cfg, config, pre_process, post_process)
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights
        self.input_needs_grad = False  # set by models/lora.apply_lora: only adapters train
        self._freeze()

    def build_vision(self, cfg, parallel: ParallelSettings):
        """(vision encoder, projector) of the first pipeline stage."""
        vision_config = vision_transformer_config(cfg, parallel)
        return VisionEncoder(cfg.vision, vision_config), VisionProjector(cfg.vision, vision_config)

    def rope_positions(self, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor], video_grid_thw: Optional[torch.Tensor],
                       second_per_grid_ts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """M-RoPE position ids [3, b, s] when the caller gives none; Qwen2-VL's videos step by temporal patch,
        so ``second_per_grid_ts`` is not used here."""
        position_ids, _ = get_rope_index(
            input_ids, image_grid_thw, attention_mask, spatial_merge_size=self.cfg.vision.spatial_merge_size,
            image_token_id=self.cfg.image_token_id, video_token_id=self.cfg.video_token_id,
            vision_start_token_id=self.cfg.vision_start_token_id, video_grid_thw=video_grid_thw)
        return position_ids

    # ---- freezing ------------------------------------------------------------------------
    def _freeze(self) -> None:
        """Frozen parts keep requires_grad=False: megatron's DDP and optimizer then skip them."""
        parts = [(self.cfg.freeze_language_model, self.language_model)]
        if self.pre_process:
            parts += [(self.cfg.freeze_vision_encoder, self.vision_encoder),
                      (self.cfg.freeze_vision_projector, self.vision_projector)]
        for frozen, module in parts:
            if frozen:
                for p in module.parameters():
                    p.requires_grad_(False)

    # ---- megatron pipeline hooks ---------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    # ---- forward -------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[n_patches, 1176] -> LLM-width features [n_patches / merge**2, h], images in order."""
        train_vit = not self.cfg.freeze_vision_encoder
        train_any = train_vit or not self.cfg.freeze_vision_projector
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_vit):
            patches = self.vision_encoder(pixel_values, image_grid_thw)
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_any):
            return self.vision_projector(patches)

    def vision_features(self, pixel_values: Optional[torch.Tensor], image_grid_thw: Optional[torch.Tensor],
                        pixel_values_videos: Optional[torch.Tensor], video_grid_thw: Optional[torch.Tensor]):
        """(image features [n_image_patches / merge**2, h] or None, video features [n_video_patches / merge**2, h]
        or None), images and videos each in order.

        One ViT call for both, patches and grids concatenated (images first): the ViT attends within each
        frame (cu_seqlens per grid row) and everything else is per patch, so this is HF's two calls'
        math, in one pass through the ViT's layers (fewer, larger kernels; one recompute region).
        """
        merge = self.cfg.vision.spatial_merge_size
        parts = []
        for kind, pixels, grid in (("image", pixel_values, image_grid_thw),
                                   ("video", pixel_values_videos, video_grid_thw)):
            if pixels is None:
                continue
            name = "pixel_values" if kind == "image" else "pixel_values_videos"
            if grid is None:
                raise UserError(f"{name} given without {kind}_grid_thw")
            grid = grid.detach().cpu().long()
            if pixels.shape[0] != int(grid.prod(-1).sum()):
                raise UserError(f"{name} has {pixels.shape[0]} patch rows but {kind}_grid_thw gives "
                                f"{int(grid.prod(-1).sum())}")
            parts.append((kind, pixels, grid))
        if not parts:
            return None, None
        dtype = self.vision_encoder.patch_embed.weight.dtype
        features = self.image_features(torch.cat([p.to(dtype) for _, p, _ in parts]),
                                       torch.cat([g for _, _, g in parts]))
        out, start = {}, 0
        for kind, pixels, _ in parts:
            count = pixels.shape[0] // merge ** 2
            out[kind] = features[start:start + count]
            start += count
        return out.get("image"), out.get("video")

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                inference_context=None, cu_seqlens: Optional[torch.Tensor] = None,
                pixel_values_videos: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                second_per_grid_ts: Optional[torch.Tensor] = None):
        """input_ids [b, s]; position_ids [3, b, s] or None; attention_mask [b, s] (1 = token) or None;
        pixel_values [n_patches, 1176]; image_grid_thw [n_img, 3]; labels [b, s] already shifted;
        pixel_values_videos [n_video_patches, 1176] (C * temporal_patch * P * P, as images);
        video_grid_thw [n_vid, 3] (t >= 1 temporal patches, h, w); second_per_grid_ts [n_vid] (seconds per
        temporal patch: used by families with absolute video time, Qwen2.5-VL, when position_ids is None).

        Images fill the <|image_pad|> tokens, videos the <|video_pad|> tokens, each in order (sample 0
        first; a video's t*h*w / merge**2 tokens frame by frame).  Each sample's token counts must match its
        images' / videos' features (a one-line UserError names the sample).  Later pipeline stages need
        image_grid_thw and video_grid_thw too when position_ids is None.

        ``cu_seqlens`` int32 [n + 1] (sequence packing, b = 1): the row holds n independent sequences
        (0, n1, n1 + n2, ..., s); attention stays within each and attention_mask is not used.  The
        positions must then be given: each sample's own (data/collate.py PackedCollator).

        Last stage: loss [b, s] (fp32, 0 at -100) with labels, else logits [b, s, V/TP].
        Other stages: hidden states [s, b, h] for the next stage.

        ``inference_context`` (megatron StaticInferenceContext, eval mode): KV-cached decoding as in
        mindspeed_mm/inference/generate.py; input_ids and position_ids hold only the new tokens (the
        cache holds rotated keys, models/rotated_kv_cache.py) while attention_mask covers the whole
        sequence so far, and the logits are gathered over TP: [b, s_new, V].
        """
        tp = self.parallel.tensor_parallel
        packed = None
        if cu_seqlens is not None:
            if position_ids is None or input_ids.shape[0] != 1:
                raise ValueError("cu_seqlens (a packed row) needs input_ids [1, s] and each sample's position_ids")
            packed, attention_mask = packed_sequences(cu_seqlens), None
        if self.parallel.sequence_parallel and input_ids.shape[1] % tp:
            raise UserError(f"--sequence-parallel: sequence length {input_ids.shape[1]} is not a multiple of "
                            f"--tensor-model-parallel-size {tp}; pad batches to a multiple of it")
        if position_ids is None:
            position_ids = self.rope_positions(input_ids, image_grid_thw, attention_mask, video_grid_thw,
                                               second_per_grid_ts)
        decoder_input = None
        decoding = inference_context is not None and inference_context.sequence_len_offset > 0
        if self.pre_process:
            images = videos = None
            if not decoding:  # generated tokens never bring images or videos (HF does not check them either)
                merge = self.cfg.vision.spatial_merge_size
                check_vision_tokens(input_ids, image_grid_thw if pixel_values is not None else None,
                                    self.cfg.image_token_id, merge, "image")
                check_vision_tokens(input_ids, video_grid_thw if pixel_values_videos is not None else None,
                                    self.cfg.video_token_id, merge, "video")
                images, videos = self.vision_features(pixel_values, image_grid_thw, pixel_values_videos,
                                                      video_grid_thw)
            decoder_input = self.language_model.embed(input_ids, images, videos)
            if self.input_needs_grad and torch.is_grad_enabled() and not decoder_input.requires_grad:
                # Frozen embedding (LoRA): full recompute and the pipeline's backward need a graph from here.
                decoder_input = decoder_input.detach().requires_grad_()
        inference = {} if inference_context is None else dict(inference_context=inference_context,
                                                              runtime_gather_output=True)
        return self.language_model(input_ids, position_ids, padding_to_megatron_mask(attention_mask),
                                   decoder_input=decoder_input, labels=labels, packed_seq_params=packed, **inference)

    # ---- weights -------------------------------------------------------------------------
    def load_full_state(self, full_state: Mapping[str, torch.Tensor], tp_rank: Optional[int] = None,
                        pp_rank: Optional[int] = None) -> None:
        """Load a full TP=1 state in our names (e.g. ``QWEN2VL.hf_to_mm(hf_state, cfg)``, or the family's spec).

        This rank's shard is cut by the table-driven ``models.sharding.shard_state`` and loaded strictly.
        """
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
        pp_rank = parallel_state.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
        shard = shard_state(self.mapping, full_state, self.cfg, self.parallel.tensor_parallel, tp_rank,
                            self.stage_layers, pp_rank)
        missing, unexpected = self.load_state_dict(shard, strict=False)
        missing = [k for k in missing if f".{ADAPTER}.lora_" not in k]  # LoRA adapters are not base weights
        if missing or unexpected:
            raise RuntimeError(f"load_full_state: missing {missing[:3]}, unexpected {unexpected[:3]}")
