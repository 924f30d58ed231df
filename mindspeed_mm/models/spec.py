"""A model family as one spec: architecture config, model stage, weight mapping, shard/merge.

The converter, the trainer and inference take everything family-specific from
a :class:`ModelSpec` (``mindspeed_mm.models.get_spec``): how to read the
model JSON / an HF ``config.json`` (``config_cls``), which megatron module is
one pipeline stage (``model``, imported on first use so conversion never pays
for megatron), and the mapping table that names, transforms and TP-splits
every parameter.  The pipeline rule (ViT + projector + embedding on the first
stage, final norm + output layer on the last) is the same for every family
here and lives in models/parallel.py and models/sharding.py.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import mindspeed_mm.models.sharding as sharding
from mindspeed_mm.models.mapping import Entry, HFToOurs, MappingTable, OursToHF

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSpec:
    name: str                 # HF model_type, e.g. "qwen2_vl"
    display_name: str         # for messages, e.g. "Qwen2-VL"
    hf_architecture: str      # config.json "architectures", e.g. "Qwen2VLForConditionalGeneration"
    config_cls: type          # load(path) / from_hf(dict) / to_dict(), validated on construction
    model_path: str           # "module:Class" of one pipeline stage (a megatron module)
    mapping: MappingTable

    @property
    def model_cls(self):
        module, name = self.model_path.split(":")
        return getattr(importlib.import_module(module), name)

    def build_stage(self, cfg, parallel, pre_process: bool = True, post_process: bool = True):
        """This rank's pipeline stage (megatron's process groups must exist)."""
        return self.model_cls(cfg, parallel, pre_process=pre_process, post_process=post_process)

    # ---- mapping (HF <-> ours, full TP=1 states) -----------------------------------------
    def entries(self, cfg) -> List[Entry]:
        return self.mapping.entries(cfg)

    def hf_to_mm(self, hf_state: Mapping[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
        return self.mapping.hf_to_mm(hf_state, cfg)

    def mm_to_hf(self, mm_state: Mapping[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
        return self.mapping.mm_to_hf(mm_state, cfg)

    def hf_view(self, mm_state: Mapping[str, torch.Tensor], cfg) -> OursToHF:
        """Lazy hub-layout HF state over our full state."""
        return OursToHF(mm_state, cfg, self.mapping)

    def ours_view(self, hf_state: Mapping[str, torch.Tensor], cfg) -> HFToOurs:
        """Lazy full state in our names over a hub-layout HF state."""
        return HFToOurs(hf_state, cfg, self.mapping)

    # ---- shard / merge over TP x PP ------------------------------------------------------
    def stage_names(self, cfg, stage_layers: Sequence[int], pp_rank: int) -> List[Tuple[str, str]]:
        return sharding.stage_names(self.mapping, cfg, stage_layers, pp_rank)

    def shard_tensor(self, name: str, t: torch.Tensor, cfg, tp_size: int, tp_rank: int) -> torch.Tensor:
        return sharding.shard_tensor(self.mapping, name, t, cfg, tp_size, tp_rank)

    def shard_state(self, full_state, cfg, tp_size: int, tp_rank: int, stage_layers: Sequence[int],
                    pp_rank: int) -> Dict[str, torch.Tensor]:
        return sharding.shard_state(self.mapping, full_state, cfg, tp_size, tp_rank, stage_layers, pp_rank)

    def merge_shards(self, shards, cfg, stage_layers: Sequence[int]) -> Dict[str, torch.Tensor]:
        return sharding.merge_shards(self.mapping, shards, cfg, stage_layers)

    def merged_view(self, shards, cfg, stage_layers: Sequence[int], config_source: str = "the model config",
                    rank_name: Optional[Callable[[int, int], str]] = None) -> sharding.MergedView:
        return sharding.MergedView(self.mapping, shards, cfg, stage_layers, config_source, rank_name)
