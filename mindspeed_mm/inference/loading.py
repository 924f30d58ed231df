"""Checkpoint, model config and processors for inference, each checked against the others.

Any saved layout loads at any tensor-parallel size: the rank files of the
saved TP x PP grid are memory-mapped, merged one tensor at a time into the
full state (the spec's merged_view, models/sharding.py) and cut again for this rank
(Qwen2VLModel.load_full_state).  A LoRA save (lora.json) loads its base the
same way and attaches its adapters, merged and cut again likewise.  Inference
runs the whole model on every rank (no pipeline stages).
"""
import functools
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from mindspeed_mm.data.preprocess import load_processors as data_load_processors
from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import load_json
from mindspeed_mm.models import load_model_config as load_model_config_of
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig

# Tokens the chat format needs, and the config field that must agree with the tokenizer.
VISION_TOKENS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                 "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}
DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
END_OF_TURN = "<|im_end|>"


def load_model_config(load: str, mm_model: Optional[str], params_dtype: Optional[str]) -> Qwen2VLConfig:
    """--mm-model when given, else the checkpoint's model.json."""
    path = mm_model or os.path.join(load, "model.json")
    if mm_model is None and not os.path.isfile(path):
        raise UserError(f"--load {load}: no model.json in the checkpoint; name the architecture with --mm-model")
    cfg = load_model_config_of(path)
    if params_dtype:
        cfg.dtype = params_dtype
    return cfg


# The HF folder's tokenizer and image processor, loaded as training loads them; messages name the flag.
load_processors = functools.partial(data_load_processors, key="--tokenizer-path")


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


def default_stop_ids(tokenizer, tokenizer_path: str) -> Tuple[List[int], str]:
    """What HF ``generate`` stops at: generation_config.json's eos_token_id (in the HF folder), else the
    tokenizer's <|im_end|> and <|endoftext|> (those it has), else its eos token.  (ids, where they came from)"""
    path = os.path.join(tokenizer_path, "generation_config.json")
    if os.path.isfile(path):
        config = load_json(path)
        eos = config.get("eos_token_id") if isinstance(config, dict) else None
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise UserError(f"{path}: eos_token_id {eos!r} is not a token id or a list of them")
            return list(ids), f"{path}: eos_token_id"
    ids = [tokenizer.convert_tokens_to_ids(t) for t in DEFAULT_STOP_TOKENS if t in tokenizer.get_vocab()]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids, f"the tokens {', '.join(DEFAULT_STOP_TOKENS)} of {tokenizer_path}"


def stop_token_ids(settings, tokenizer, cfg: Qwen2VLConfig, tokenizer_path: str) -> List[int]:
    """The stop ids: given ones (flag or JSON) or the HF folder's own; a stop set without the chat
    format's end-of-turn token is reported (answers would run to max_new_tokens)."""
    if settings.stop_token_ids is not None:
        ids, where = list(settings.stop_token_ids), settings.label("stop_token_ids")
    else:
        ids, where = default_stop_ids(tokenizer, tokenizer_path)
    for t in ids:
        if t >= cfg.text.vocab_size:
            raise UserError(f"{where}: stop id {t} is outside the model's vocabulary ({cfg.text.vocab_size}); "
                            f"leave stop_token_ids unset to take them from {tokenizer_path}")
    end_of_turn = tokenizer.get_vocab().get(END_OF_TURN)
    if ids and end_of_turn is not None and end_of_turn not in ids:
        print(f"warning: {where}: stop ids {ids} do not include {END_OF_TURN} (id {end_of_turn} in "
              f"{tokenizer_path}), which ends every assistant turn: answers will run on to the limit",
              file=sys.stderr, flush=True)
    return ids


def model_source(load: str, mm_model: Optional[str]) -> str:
    return mm_model or os.path.join(load, "model.json")


def _load_error(exc: UserError) -> UserError:
    """checkpoint.megatron_io names the converter's --load-dir; here the flag is --load."""
    return UserError(str(exc).replace("--load-dir ", "--load ", 1))


def find_checkpoint(load: str, iteration: Optional[int]):
    """The saved layout of --load (at --iteration when given), with messages naming those flags."""
    from checkpoint.layout import iteration_dir
    from checkpoint.megatron_io import find_layout

    if iteration is not None and not os.path.isdir(iteration_dir(load, iteration)):
        saved = sorted(n for n in os.listdir(load) if n == "release" or n.startswith("iter_"))
        raise UserError(f"--iteration {iteration}: {os.path.basename(iteration_dir(load, iteration))}/ not found "
                        f"in --load {load} (saved: {', '.join(saved) or 'none'})")
    try:
        return find_layout(load, iteration)
    except UserError as exc:
        raise _load_error(exc) from None


@dataclass(frozen=True)
class OpenedCheckpoint:
    """What --load holds: the full weights (lazy, merged from the rank files) and, for a LoRA save, its
    settings and full adapters (the weights are then its base's)."""
    weights: Mapping
    lora: Optional[Tuple[object, Dict[str, object]]] = None  # (LoRASettings, full adapters)


def open_checkpoint(cfg: Qwen2VLConfig, load: str, iteration: Optional[int], source: str) -> OpenedCheckpoint:
    """--load opened and checked against ``cfg``; a LoRA save (lora.json) opens its base and reads its
    adapters (from any TP x PP layout)."""
    from checkpoint.lora_io import read_adapters, read_lora_record

    record = read_lora_record(load)
    if record is None:
        return OpenedCheckpoint(_open_weights(cfg, load, iteration, source))
    if not os.path.isdir(record.base):
        raise UserError(f"--load {load}: the base checkpoint its lora.json names, {record.base}, is not there")
    tag = record.base_iteration
    weights = _open_weights(cfg, record.base, None if tag == "release" else int(tag), source)
    try:
        _, adapters = read_adapters(load, cfg, iteration)
    except UserError as exc:
        raise _load_error(exc) from None
    return OpenedCheckpoint(weights, (record.settings, adapters))


def _open_weights(cfg: Qwen2VLConfig, load: str, iteration: Optional[int], source: str):
    """The full state of a checkpoint, merged lazily from its memory-mapped rank files, checked against
    ``cfg``: every tensor's shape, and the LLM layers of each saved pipeline stage (layout.json)."""
    from checkpoint.layout import format_layout, read_layout
    from checkpoint.megatron_io import load_rank, stage_layers_of
    from mindspeed_mm.models import spec_of

    layout = find_checkpoint(load, iteration)
    states = {r: load_rank(layout.rank_file(*r)) for r in layout.ranks()}  # memory-mapped
    saved_layers = stage_layers_of(layout, states)
    recorded = read_layout(layout.directory)
    if recorded["pipeline_num_layers"] is not None and recorded["pipeline_num_layers"] != saved_layers:
        raise UserError(f"{layout.directory}: layout.json says {format_layout(recorded)} but the rank files hold "
                        f"LLM layers {saved_layers} per stage: the checkpoint folder is inconsistent")
    if sum(saved_layers) != cfg.text.num_layers:
        raise UserError(f"--load {load}: the checkpoint holds {sum(saved_layers)} LLM layers but {source} "
                        f"says text.num_layers = {cfg.text.num_layers}")
    return spec_of(cfg).merged_view(states, cfg, saved_layers, config_source=source, rank_name=layout.rank_file)


def load_model(cfg: Qwen2VLConfig, checkpoint: OpenedCheckpoint, tensor_parallel: int):
    """The whole model on this rank (eval mode), TP-sharded for ``tensor_parallel``, with a LoRA save's
    adapters attached; call after init_distributed.  ``checkpoint``: open_checkpoint's."""
    from megatron.core import parallel_state

    from mindspeed_mm.models import lora, spec_of
    from mindspeed_mm.models.parallel import ParallelSettings

    spec = spec_of(cfg)
    model = spec.build_stage(cfg, ParallelSettings(tensor_parallel=tensor_parallel))
    model.load_full_state(checkpoint.weights, pp_rank=0)
    if checkpoint.lora is not None:
        settings, adapters = checkpoint.lora
        specs = lora.adapter_specs(spec.mapping, cfg, settings.targets)
        lora.apply_lora(model, specs, settings, adapters, tensor_parallel,
                        parallel_state.get_tensor_model_parallel_rank())
    return model.eval()
