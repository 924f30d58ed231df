"""LoRA checkpoints on disk, and their export as a PEFT adapter folder.

A LoRA training run saves only what it trains, in the Megatron layout, beside a reference to its base:

    SAVE/lora.json      {"lora": {rank, alpha, dropout, targets}, "base": <base checkpoint folder>,
                         "base_iteration": "release" | N}
    SAVE/iter_{N:07d}/mp_rank_.../model_optim_rng.pt
                        {'model': this stage's adapters (``<linear>.lora.lora_A.<k>``), 'optimizer': theirs, ...}
    SAVE/iter_{N:07d}/layout.json, SAVE/model.json, the tracker: as for any checkpoint

The PEFT folder is what ``peft.PeftModel.from_pretrained(Qwen2VLForConditionalGeneration..., folder)`` and
vLLM's LoRA loader read: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_{A,B}.weight`` (transformers-5 module paths).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple

from checkpoint.layout import iteration_dir, read_layout
from checkpoint.megatron_io import find_layout, load_rank
from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import atomic_path, load_json, write_json_atomic
from mindspeed_mm.models import spec_of

if TYPE_CHECKING:  # models/lora.py imports torch: loaded only for a LoRA save (the export of a full one skips it)
    import torch

    from mindspeed_mm.models import lora

LORA_FILE = "lora.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# hub names -> transformers-5 module paths (the inverse of mapping.hub_key)
_MODULE_PATHS = (("visual.", "model.visual."), ("model.", "model.language_model."))
# our targets -> the HF module-name suffixes PEFT's target_modules matches on
PEFT_TARGET_NAMES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",),
    "vision.linear_qkv": ("attn.qkv",), "vision.linear_proj": ("attn.proj",),
    "vision.linear_fc1": ("mlp.fc1",), "vision.linear_fc2": ("mlp.fc2",),
    "projector.linear_fc1": ("merger.mlp.0",), "projector.linear_fc2": ("merger.mlp.2",),
}


@dataclass(frozen=True)
class LoRARecord:
    """What SAVE/lora.json says: the adapters' settings and the base checkpoint they sit on."""
    settings: "lora.LoRASettings"
    base: str
    base_iteration: object  # "release" or an int

    def to_dict(self) -> dict:
        return {"lora": self.settings.to_dict(), "base": self.base, "base_iteration": self.base_iteration}


def write_lora_record(save_dir: str, record: LoRARecord) -> None:
    write_json_atomic(os.path.join(save_dir, LORA_FILE), record.to_dict(), indent=2)


def read_lora_record(load_dir: str) -> Optional[LoRARecord]:
    """The record of a LoRA checkpoint folder, or None for a full checkpoint."""
    path = os.path.join(load_dir, LORA_FILE)
    if not os.path.isfile(path):
        return None
    from mindspeed_mm.models import lora

    data = load_json(path)
    try:
        settings = lora.LoRASettings.from_dict(data["lora"])
        base, tag = str(data["base"]), data["base_iteration"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a LoRA record ({exc.__class__.__name__}: {exc})") from None
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    if not os.path.isabs(base):  # recorded relative to the LoRA folder when it was given so
        base = os.path.normpath(os.path.join(load_dir, base))
    return LoRARecord(settings, base, tag)


def read_adapters(load_dir: str, cfg, iteration=None) -> Tuple[LoRARecord, Dict[str, torch.Tensor]]:
    """(record, the full adapter state in our names) of a LoRA checkpoint, from any TP x PP layout."""
    from mindspeed_mm.models import lora

    record = read_lora_record(load_dir)
    if record is None:
        raise UserError(f"--load-dir {load_dir}: no {LORA_FILE}: not a LoRA checkpoint")
    layout = find_layout(load_dir, iteration)
    recorded = read_layout(layout.directory)["pipeline_num_layers"]
    stage_layers = recorded if recorded is not None else [cfg.text.num_layers]
    if len(stage_layers) != layout.pp_size or sum(stage_layers) != cfg.text.num_layers:
        raise UserError(f"{iteration_dir(load_dir, layout.iteration)}: LLM layers per stage {stage_layers} do not fit "
                        f"{layout.pp_size} stage folders and {cfg.text.num_layers} layers")
    states = {r: load_rank(layout.rank_file(*r), mmap=False) for r in layout.ranks()}
    specs = lora.adapter_specs(spec_of(cfg).mapping, cfg, record.settings.targets)
    full = lora.merge_stage_states(specs, states, layout.tp_size, stage_layers, source=layout.rank_file)
    return record, full


def module_path(hub_module: str) -> str:
    """A hub module name as transformers-5 names the module (what PEFT's keys use)."""
    for hub, internal in _MODULE_PATHS:
        if hub_module.startswith(hub):
            return internal + hub_module[len(hub):]
    return hub_module


def peft_state(hf_adapters: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``<hub module>.lora_A.weight`` -> PEFT's saved key."""
    out = {}
    for key, t in hf_adapters.items():
        module, rest = key.rsplit(".lora_", 1)
        out[f"{PEFT_PREFIX}{module_path(module)}.lora_{rest}"] = t.contiguous()
    return out


def peft_config(settings: lora.LoRASettings, base_model: Optional[str]) -> dict:
    """PEFT's LoraConfig as JSON, for exactly the adapted projections (module-name suffixes)."""
    targets = sorted({n for t in settings.targets for n in PEFT_TARGET_NAMES[t]})
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": targets, "exclude_modules": None, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_peft_adapter(out_dir: str, hf_adapters: Mapping[str, torch.Tensor], settings: lora.LoRASettings,
                       base_model: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> list:
    """Write the PEFT folder's two files (each atomically) into ``out_dir``; returns their names."""
    from safetensors.torch import save_file

    state = peft_state(hf_adapters)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with atomic_path(os.path.join(out_dir, PEFT_WEIGHTS)) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    write_json_atomic(os.path.join(out_dir, PEFT_CONFIG), peft_config(settings, base_model), indent=2)
    return [PEFT_CONFIG, PEFT_WEIGHTS]


def export_lora(load_dir: str, save_dir: str, hf_dir: str, iteration=None, merge: bool = False,
                params_dtype: Optional[str] = None, overwrite: bool = False, **convert_kwargs):
    """Export a LoRA save: a PEFT adapter folder for ``hf_dir``'s model, or (``merge``) a full HF folder
    with the adapters folded into its base's weights (the ordinary export of the base, adjusted)."""
    from checkpoint.convert import Summary, convert_mm_to_hf
    from checkpoint.hf_io import read_hf_config
    from checkpoint.staging import check_save_dir, staged_dir
    from mindspeed_mm.constants import torch_dtype
    from mindspeed_mm.models import lora

    start = time.time()
    _, spec, cfg = read_hf_config(hf_dir)
    record, full = read_adapters(load_dir, cfg, iteration)
    specs = lora.adapter_specs(spec.mapping, cfg, record.settings.targets)
    hf_adapters = lora.full_to_hf(full, specs, cfg)
    if merge:
        tag = record.base_iteration
        return convert_mm_to_hf(record.base, save_dir, hf_dir, iteration=None if tag == "release" else int(tag),
                                params_dtype=params_dtype, overwrite=overwrite,
                                adjust=lora.merge_into(hf_adapters, record.settings.scale), **convert_kwargs)
    check_save_dir(save_dir, overwrite, [load_dir, hf_dir])
    summary = Summary(save_dir)
    with staged_dir(save_dir) as tmp:
        summary.files = write_peft_adapter(tmp, hf_adapters, record.settings, os.path.abspath(hf_dir),
                                           torch_dtype(params_dtype) if params_dtype else None)
        summary.bytes_written = sum(os.path.getsize(os.path.join(tmp, f)) for f in summary.files)
    summary.tensors = len(hf_adapters)
    summary.parameters = sum(t.numel() for t in hf_adapters.values())
    summary.seconds = time.time() - start
    return summary
