"""Checkpoint, model config and processors for inference, each checked against the others.

Any saved layout loads at any tensor-parallel size: the rank files of the
saved TP x PP grid are memory-mapped, merged one tensor at a time into the
full state (checkpoint.parallel.MergedView) and cut again for this rank
(Qwen2VLModel.load_full_state).  Inference runs the whole model on every
rank (no pipeline stages).
"""
import os
from typing import List, Optional

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.config import Qwen2VLConfig

# Tokens the chat format needs, and the config field that must agree with the tokenizer.
VISION_TOKENS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                 "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}
DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def load_model_config(load: str, mm_model: Optional[str], params_dtype: Optional[str]) -> Qwen2VLConfig:
    """--mm-model when given, else the checkpoint's model.json."""
    path = mm_model or os.path.join(load, "model.json")
    if mm_model is None and not os.path.isfile(path):
        raise UserError(f"--load {load}: no model.json in the checkpoint; name the architecture with --mm-model")
    cfg = Qwen2VLConfig.load(path)
    if params_dtype:
        cfg.dtype = params_dtype
    return cfg


def load_processors(tokenizer_path: str, min_pixels: Optional[int], max_pixels: Optional[int]):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = Qwen2VLImageProcessor.from_pretrained(tokenizer_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"--tokenizer-path {tokenizer_path}: cannot load the tokenizer / image processor "
                        f"({str(exc).splitlines()[0]})") from None
    return tokenizer, image_processor


def check_tokenizer(cfg: Qwen2VLConfig, tokenizer, model_source: str, tokenizer_path: str) -> None:
    """The tokenizer must fit the model's vocabulary and agree on the vision token ids."""
    if len(tokenizer) > cfg.text.vocab_size:
        raise UserError(f"{model_source}: text.vocab_size {cfg.text.vocab_size} is smaller than the "
                        f"{len(tokenizer)} tokens of {tokenizer_path}: the checkpoint and tokenizer do not match")
    for token, key in VISION_TOKENS.items():
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid != getattr(cfg, key):
            raise UserError(f"{model_source}: {key} = {getattr(cfg, key)} but {tokenizer_path} gives {token} "
                            f"id {tid}: the checkpoint and tokenizer do not match")


def stop_token_ids(requested: Optional[List[int]], tokenizer, cfg: Qwen2VLConfig) -> List[int]:
    ids = requested
    if ids is None:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in DEFAULT_STOP_TOKENS]
        ids = [t for t in ids if t is not None and t != tokenizer.unk_token_id]
    for t in ids:
        if t >= cfg.text.vocab_size:
            raise UserError(f"generation.stop_token_ids: {t} is outside the model's vocabulary "
                            f"({cfg.text.vocab_size}); the real Qwen2-VL ids need the real tokenizer")
    return list(ids)


def model_source(load: str, mm_model: Optional[str]) -> str:
    return mm_model or os.path.join(load, "model.json")


def load_model(cfg: Qwen2VLConfig, load: str, iteration: Optional[int], tensor_parallel: int, source: str):
    """The whole model on this rank (eval mode), TP-sharded for ``tensor_parallel``; call after init_distributed."""
    from checkpoint.megatron_io import find_layout, load_rank, stage_layers_of
    from checkpoint.parallel import MergedView
    from mindspeed_mm.models.parallel import ParallelSettings
    from mindspeed_mm.models.qwen2vl import Qwen2VLModel

    layout = find_layout(load, iteration)
    states = {r: load_rank(layout.rank_file(*r)) for r in layout.ranks()}  # memory-mapped
    saved_layers = stage_layers_of(layout, states)
    if sum(saved_layers) != cfg.text.num_layers:
        raise UserError(f"--load {load}: the checkpoint holds {sum(saved_layers)} LLM layers but {source} "
                        f"says text.num_layers = {cfg.text.num_layers}")
    model = Qwen2VLModel(cfg, ParallelSettings(tensor_parallel=tensor_parallel))
    try:
        model.load_full_state(MergedView(states, cfg, saved_layers), pp_rank=0)
    except (RuntimeError, ValueError) as exc:  # shape mismatch: another architecture
        raise UserError(f"--load {load}: does not fit the architecture of {source} "
                        f"({str(exc).splitlines()[-1].strip()})") from None
    return model.eval()
