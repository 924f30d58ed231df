"""LoRA in a training run: which base the adapters sit on, attaching them, what a checkpoint holds.

* ``--load`` a full checkpoint (converted ``release`` or a full training save): its weights are the base,
  the adapters start from PEFT's initialisation (seeded, the same for any TP x PP), iteration 0;
* ``--load`` a LoRA save (it has ``lora.json``): the base named there is loaded first, then the adapters,
  their optimizer state, the schedule, the data position and RNG: an exact resume.

A LoRA run's checkpoints hold only the adapters (checkpoint/lora_io.py), so they are small; the base must
stay where ``lora.json`` says.
"""
from __future__ import annotations

import os
from typing import Optional

from checkpoint.layout import read_tracker
from checkpoint.lora_io import LoRARecord, read_lora_record
from mindspeed_mm.errors import UserError
from mindspeed_mm.models import lora, spec_of
from mindspeed_mm.training.config import TrainingConfig


def attach(model, config: TrainingConfig, model_cfg, tp_rank: int) -> None:
    """Freeze the stage and attach this rank's adapters, initialised as PEFT does (before DDP wraps it)."""
    settings = config.lora.settings
    specs = lora.adapter_specs(spec_of(model_cfg).mapping, model_cfg, settings.targets)
    full = lora.init_full(specs, settings.rank, config.seed)
    lora.apply_lora(model, specs, settings, full, config.parallel.tensor_model_parallel_size, tp_rank)


def describe(model, config: TrainingConfig) -> str:
    """The log line: what trains and how much of the stage that is."""
    s = config.lora.settings
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA rank {s.rank}, alpha {s.alpha:g} (scale {s.scale:g}), dropout {s.dropout:g} on "
            f"{', '.join(s.targets)}: {trained:,} adapter parameters train on this rank ({100 * trained / total:.2f}% "
            f"of its {total:,}), every base weight frozen")


def base_of(config: TrainingConfig) -> LoRARecord:
    """The record the run's checkpoints will carry: its adapters' settings and the base under them."""
    c = config.checkpoints
    record = read_lora_record(c.load)
    if record is not None:  # resuming a LoRA run: the same base
        return LoRARecord(config.lora.settings, record.base, record.base_iteration)
    tag = read_tracker(c.load) if c.ckpt_step is None else c.ckpt_step
    return LoRARecord(config.lora.settings, os.path.abspath(c.load), tag)


def check_lora_load(config: TrainingConfig) -> Optional[LoRARecord]:
    """--load against the LoRA flags (before any process starts): a LoRA save needs the same settings
    and its base; a LoRA save without --lora-rank is refused.  Returns the saved record, if any."""
    load = config.checkpoints.load
    record = read_lora_record(load) if load else None
    if record is None:
        return None
    if not config.lora.enabled:
        raise UserError(f"--load {load} holds LoRA adapters (on the base {record.base}): continue it with the "
                        f"same --lora-rank / --lora-alpha / --lora-target-modules (the *_lora.sh launchers), or "
                        f"export it with examples/qwen2vl/qwen2vl_convert_to_hf.py")
    asked, saved = config.lora.settings, record.settings
    diffs = [f"{flag} {a} (saved: {b})" for flag, a, b in (
        ("--lora-rank", asked.rank, saved.rank), ("--lora-alpha", asked.alpha, saved.alpha),
        ("--lora-dropout", asked.dropout, saved.dropout),
        ("--lora-target-modules", ",".join(asked.targets), ",".join(saved.targets))) if a != b]
    if diffs:
        raise UserError(f"--load {load}: its adapters were trained with other LoRA settings: {'; '.join(diffs)}")
    if not os.path.isdir(record.base):
        raise UserError(f"--load {load}: the base checkpoint its lora.json names, {record.base}, is not there; "
                        f"put it back (the adapters train on it)")
    return record
