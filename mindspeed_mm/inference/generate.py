"""Incremental decoding with a KV cache: megatron-core's static-batching inference context.

One prefill pass runs the prompts (left-padded to one length, images
included); each decode step then runs only the newest token per sample,
attending to the keys and values cached by megatron's attention layers
(``StaticInferenceContext``: per-layer buffers [max_len, b, kv_heads*hd]).

Two things are specific to Qwen2-VL:

* M-RoPE decoding positions follow HF's ``rope_deltas`` rule: the prompt's
  3-D positions come from ``get_rope_index``; the k-th generated token of a
  sample (k = 0, 1, ...) sits at ``real_prompt_length + k + rope_delta`` on
  all three axes, which continues right after the largest prompt position.
* the cache holds keys already rotated (models/rotated_kv_cache.py), so a
  decode step passes the positions of its new tokens only, [3, b, 1]; the
  padding mask covers the whole sequence so far (left padding stays masked
  for every later token) and is left out altogether when nothing is padded.

Logits come back gathered over TP with the padded vocabulary columns at
-inf; every TP rank picks the same token (the TP source rank's choice is
broadcast, which also keeps sampling identical).

Imports megatron-core: import it after :func:`mindspeed_mm.platform.setup_platform`.
"""
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from mindspeed_mm.inference.arguments import GenerationSettings
from mindspeed_mm.inference.prompts import PromptBatch
from mindspeed_mm.inference.sampling import next_tokens
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from mindspeed_mm.models.rope_index import get_rope_index


@dataclass
class GenerationStats:
    batch_size: int = 0
    prompt_tokens: int = 0  # padded prompt length
    new_tokens: int = 0  # decode steps run (the longest answer)
    prefill_seconds: float = 0.0  # prompt pass, first token included
    decode_seconds: float = 0.0  # every later token

    @property
    def decode_tokens_per_second(self) -> float:
        steps = (self.new_tokens - 1) * self.batch_size
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """ids [b, s] and attention_mask [b, s] (1 = token), padding on the left like HF's generate."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[b, length - len(seq):] = 1
    return ids, mask


class Generator:
    """Generates for batches of prompts with the whole (TP-sharded) model on this rank."""

    def __init__(self, model, cfg: Qwen2VLConfig, settings: GenerationSettings, stop_ids: Sequence[int],
                 pad_id: int, max_length: Optional[int] = None):
        self.model, self.cfg, self.settings = model, cfg, settings
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.max_length = max_length or cfg.text.max_position_embeddings
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.generator = torch.Generator().manual_seed(settings.seed)  # CPU: see sampling.next_tokens
        self.stats = GenerationStats()

    def _positions(self, ids: torch.Tensor, mask: torch.Tensor, grid: Optional[torch.Tensor],
                   video_grid: Optional[torch.Tensor] = None, seconds: Optional[torch.Tensor] = None):
        """Prompt positions [3, b, s] and each sample's first decoding position [b]."""
        c = self.cfg
        per_second = getattr(c.vision, "tokens_per_second", None)  # Qwen2.5-VL: absolute video time
        timing = {} if per_second is None else dict(tokens_per_second=per_second, second_per_grid_ts=seconds)
        positions, deltas = get_rope_index(
            ids, grid, mask, spatial_merge_size=c.vision.spatial_merge_size, image_token_id=c.image_token_id,
            video_token_id=c.video_token_id, vision_start_token_id=c.vision_start_token_id,
            video_grid_thw=video_grid, **timing)
        return positions, mask.sum(1) + deltas[:, 0]

    @torch.inference_mode()  # not just no_grad: megatron's linears are autograd Functions, cheaper this way
    def generate(self, batch: PromptBatch,
                 on_tokens: Optional[Callable[[List[int], List[bool]], None]] = None) -> List[List[int]]:
        """Generated ids per prompt (prompt excluded, the stop id included when produced).

        ``on_tokens(tokens, finished)`` is called after every step with the new id of each sample
        (the pad id for samples already finished) and whether each sample has finished.
        """
        ids, prompt_mask = left_pad(batch.input_ids, self.pad_id)
        grid = batch.image_grid_thw
        prompt_positions, first_position = self._positions(ids, prompt_mask, grid, batch.video_grid_thw,
                                                           batch.second_per_grid_ts)
        b, s = ids.shape
        longest = int(prompt_mask.sum(1).max())
        new_tokens = min(self.settings.max_new_tokens, self.max_length - longest)
        total = s + new_tokens

        dev = self.device
        mask = None  # [b, s + new]: 1 = attend; None: no padding, nothing to mask
        if not bool(prompt_mask.all()):
            mask = torch.ones(b, total, dtype=torch.long, device=dev)
            mask[:, :s] = prompt_mask
        positions = prompt_positions.to(dev)  # [3, b, s], then [3, b, 1] per decode step
        first_position = first_position.to(dev)
        history = ids.to(dev)  # [b, s + step]: every id so far, for the repetition penalty
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=dev)
        pixels = None if batch.pixel_values is None else batch.pixel_values.to(dev, self.dtype)
        grid = None if grid is None else grid.to(dev)
        videos = {} if batch.video_grid_thw is None else dict(
            pixel_values_videos=batch.pixel_values_videos.to(dev, self.dtype), video_grid_thw=batch.video_grid_thw.to(dev))

        context = StaticInferenceContext(b, total)
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        done = [False] * b
        answers: List[List[int]] = [[] for _ in range(b)]
        tokens = history
        start = time.perf_counter()
        self.stats = GenerationStats(batch_size=b, prompt_tokens=s)
        for step in range(new_tokens):
            end = s + step  # tokens in the cache once this step's input is in
            images = (pixels, grid) if step == 0 else (None, None)
            logits = self.model(tokens, positions, None if mask is None else mask[:, :end], *images,
                                inference_context=context, **(videos if step == 0 else {}))
            context.sequence_len_offset = end
            context.enable_decode_mode()
            # logits [b, 1, padded V] -> [b, V]
            token = next_tokens(logits[:, -1, :self.cfg.text.vocab_size].float(), history, self.settings,
                                self.generator)
            token = self._same_on_tp_ranks(token)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            finished |= torch.isin(token, stop)
            new_ids = token.tolist()  # the step's host copies: ids, and finished flags after this token
            for answer, t, was_done in zip(answers, new_ids, done):
                if not was_done:
                    answer.append(t)
            done = finished.tolist()
            self.stats.new_tokens = step + 1
            if step == 0:
                self.stats.prefill_seconds = time.perf_counter() - start
            if on_tokens is not None:
                on_tokens(new_ids, done)
            if all(done):
                break
            positions = (first_position + step).expand(3, b)[:, :, None]  # the new token, at index end
            tokens = token[:, None]
            history = torch.cat([history, tokens], dim=1)
        self.stats.decode_seconds = time.perf_counter() - start - self.stats.prefill_seconds
        return answers

    @staticmethod
    def _same_on_tp_ranks(token: torch.Tensor) -> torch.Tensor:
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(token, parallel_state.get_tensor_model_parallel_src_rank(),
                                        group=parallel_state.get_tensor_model_parallel_group())
        return token
