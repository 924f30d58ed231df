"""The Qwen2-VL spec: its mapping table's TP split kinds are the built megatron parameters' own.

At TP=2 every row of the table (each layer, ViT and LLM, untied and tied head) is
checked against the parameter megatron builds: ``tensor_model_parallel`` and
``partition_dim`` must say what the row's split kind says, and the local shape
must be the piece ``shard_tensor`` cuts from the row's full shape.  A row that
drifts from the module (a bias that megatron keeps whole, a weight split on the
other dim) fails here, not in a conversion.
"""
import pytest

from mindspeed_mm.models import get_spec, spec_for_hf_config, spec_of
from mindspeed_mm.models.mapping import COLUMN, GATED_COLUMN, REPLICATED, ROW, VOCAB
from mindspeed_mm.models.qwen2vl import QWEN2VL
from tests.multiproc import run_ranks

# split kind -> (tensor_model_parallel, partition_dim) megatron sets on the parameter
EXPECTED_ATTRS = {REPLICATED: (False, None), COLUMN: (True, 0), GATED_COLUMN: (True, 0), VOCAB: (True, 0),
                  ROW: (True, 1)}


def _built_params(rank, world, tied):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch

    from mindspeed_mm.models.parallel import ParallelSettings
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import hf_config, our_config

    init_distributed(platform, world, 1, seed=1)
    try:
        cfg = our_config(hf_config(tie_word_embeddings=tied))
        model = QWEN2VL.build_stage(cfg, ParallelSettings(tensor_parallel=world))
        out = {}
        for name, p in model.named_parameters():
            tp = bool(getattr(p, "tensor_model_parallel", False))
            out[name] = (tp, getattr(p, "partition_dim", None) if tp else None, tuple(p.shape))
        # the cut the table implies for this rank, from the full shapes
        want = {local: tuple(QWEN2VL.shard_tensor(local, torch.empty(shape, device="meta"), cfg, world, rank).shape)
                for local, shape in QWEN2VL.mapping.ours_shapes(cfg).items()}
        return out, want
    finally:
        destroy_distributed()


@pytest.mark.parametrize("tied", [False, True])
def test_split_kinds_match_megatron_parameters(tied):
    results = run_ranks(_built_params, 2, tied=tied)
    for rank, (built, want) in enumerate(results):
        assert set(built) == set(want), f"rank {rank}: model and table name different parameters"
        for name, (tp, dim, shape) in built.items():
            kind = QWEN2VL.mapping.split_kind(name)
            assert (tp, dim) == EXPECTED_ATTRS[kind], f"{name}: table says {kind}, megatron builds tp={tp} dim={dim}"
            assert shape == want[name], f"rank {rank}: {name} is {shape}, the table's cut is {want[name]}"


def test_registry_finds_the_spec():
    from tests.hf_reference import our_config

    assert get_spec("qwen2_vl") is QWEN2VL
    assert spec_of(our_config()) is QWEN2VL
    assert spec_for_hf_config({"model_type": "qwen2_vl"}) is QWEN2VL
    from mindspeed_mm.errors import UserError

    with pytest.raises(UserError, match="model_type 'llama' is not supported"):
        get_spec("llama")


def test_every_row_has_a_known_split_and_every_name_is_unique():
    from tests.hf_reference import hf_config, our_config

    cfg = our_config(hf_config())
    names = [e.ours for e in QWEN2VL.entries(cfg)]
    hf_names = [h for e in QWEN2VL.entries(cfg) for h in e.hf]
    assert len(names) == len(set(names)) and len(hf_names) == len(set(hf_names))
    assert {row.split for row in QWEN2VL.mapping.rows} <= set(EXPECTED_ATTRS)


def test_load_model_config_reads_every_form_by_its_family(tmp_path):
    import json

    from mindspeed_mm.models import load_model_config
    from tests.hf_reference import hf_config, our_config

    cfg = our_config(hf_config())
    cfg.save(str(tmp_path / "model.json"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config().to_dict()))
    assert load_model_config(str(tmp_path)) == cfg  # a converted checkpoint's folder
    assert load_model_config(str(tmp_path / "model.json")) == cfg
    assert load_model_config(str(tmp_path / "hf" / "config.json")).text == cfg.text
    from mindspeed_mm.errors import UserError

    with pytest.raises(UserError, match="missing.json"):
        load_model_config(str(tmp_path / "missing.json"))
