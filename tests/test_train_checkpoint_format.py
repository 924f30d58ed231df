"""Training checkpoints say what they are (layout, schedule, data position, versions, the config
as a plain dict), and checkpoints written the old way (the flags pickled as 'args') still load."""
import argparse
import os

import pytest

from tests.multiproc import run_ranks


def _flags(model_json, save, *extra):
    return ["--mm-data", "d.json", "--mm-model", model_json, "--seq-length", "64", "--train-iters", "4",
            "--lr", "1e-3", "--save", save, *extra]


def _stack(flags, cfg, seed):
    import torch

    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.build import build_model, build_optimizer
    from mindspeed_mm.training.config import validate

    config = validate(parse_args(flags), cfg, 1)
    torch.manual_seed(seed)
    model = build_model(config, cfg)
    optimizer, scheduler = build_optimizer(config, model)
    return config, model, optimizer, scheduler


def _old_format(new: dict, config) -> dict:
    """The rank file as this project wrote it before the metadata: the flags (with validate()'s
    derived values) pickled under 'args'."""
    old = {k: new[k] for k in ("checkpoint_version", "iteration", "model", "train_state", "optimizer",
                               "opt_param_scheduler", "rng_state")}
    flat = {k: v for part in config.to_dict().values() if isinstance(part, dict) for k, v in part.items()}
    old["args"] = argparse.Namespace(**flat, stage_layers=config.stage_layers, lr_warmup_steps=0,
                                     num_microbatches=1, data_parallel_size=1)
    return old


def _save_then_load(rank, world, root):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")  # before megatron-core is imported (in this rank's own process)
    import torch

    from checkpoint.layout import LAYOUT_FILE, MODEL_FILE
    from mindspeed_mm.errors import UserError
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.checkpointing import load_checkpoint, save_checkpoint, unwrap
    from mindspeed_mm.training.preflight import TRAIN_STATE_FILE
    from mindspeed_mm.training.state import TrainState
    from tests.hf_reference import our_config

    init_distributed(platform, 1, 1, seed=3)
    cfg = our_config()
    model_json, save = os.path.join(root, "model.json"), os.path.join(root, "save")
    cfg.save(model_json)
    config, model, optimizer, scheduler = _stack(_flags(model_json, save), cfg, seed=0)
    scheduler.step(increment=2)
    state = TrainState(iteration=2, consumed_samples=4, skipped_iters=1, nan_iters=1, consecutive_nan=1)
    folder = save_checkpoint(save, model, optimizer, scheduler, state, cfg, config)
    rank_file = os.path.join(folder, "mp_rank_00", MODEL_FILE)
    new = torch.load(rank_file, map_location="cpu", weights_only=False)
    # The files the launcher's checks read stay as they were.
    assert sorted(os.listdir(folder)) == sorted([LAYOUT_FILE, TRAIN_STATE_FILE, "mp_rank_00"])

    def load(flags):
        resume, model2, opt2, sched2 = _stack(_flags(model_json, save, "--load", save, *flags), cfg, seed=1)
        loaded = load_checkpoint(save, model2, opt2, sched2, resume)
        same = all(torch.equal(a, b) for a, b in zip(unwrap(model).state_dict().values(),
                                                     unwrap(model2).state_dict().values()) if torch.is_tensor(a))
        return loaded, same, sched2.num_steps

    loaded_new = load([])
    torch.save(_old_format(new, config), rank_file)
    loaded_old = load([])
    old = torch.load(rank_file, map_location="cpu", weights_only=False)
    old["args"].stage_layers = [1, 2]
    torch.save(old, rank_file)
    with pytest.raises(UserError) as mismatch:  # the old 'args' still guard the layout
        load([])
    destroy_distributed()
    return {"keys": sorted(k for k in new if k not in ("model", "optimizer", "rng_state")),
            "layout": new["layout"], "train_state": new["train_state"], "config": new["config"],
            "versions": new["versions"], "schedule": new["schedule"],
            "loaded_new": loaded_new, "loaded_old": loaded_old, "mismatch": str(mismatch.value)}


def test_metadata_saved_and_old_checkpoints_load(tmp_path):
    from mindspeed_mm.training.state import TrainState

    (r,) = run_ranks(_save_then_load, 1, timeout=300, root=str(tmp_path))
    assert r["keys"] == ["checkpoint_version", "config", "iteration", "layout", "opt_param_scheduler", "schedule",
                         "train_state", "versions"]
    assert r["layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                           "pipeline_num_layers": [3]}
    assert r["train_state"] == {"consumed_samples": 4, "skipped_iters": 1, "nan_iters": 1}
    assert r["schedule"]["train_iters"] == 4 and r["schedule"]["num_steps"] == 2 and r["schedule"]["max_lr"] == 1e-3
    assert r["config"]["schedule"]["lr"] == 1e-3 and r["config"]["parallel"]["world_size"] == 1
    assert set(r["versions"]) == {"checkpoint_version", "mindspeed_mm", "megatron_core", "torch"}
    expected = TrainState(iteration=2, consumed_samples=4, skipped_iters=1, nan_iters=1)  # NaN streak not kept
    for loaded, same_weights, scheduler_steps in (r["loaded_new"], r["loaded_old"]):
        assert loaded == expected and same_weights and scheduler_steps == 2
    assert "saved with LLM layers per pipeline stage [1, 2], now [3]" in r["mismatch"]
