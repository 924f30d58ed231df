"""A checkpoint written by the converter loads (strictly) into our model and gives HF's logits.

The HF model is saved with save_pretrained, converted by the converter's library
function to disk, and each rank loads its own ``model_optim_rng.pt`` file: TP=1, and
TP=2 on two gloo processes (vocabulary padded per TP, heads and groups split).
"""
import pytest

from tests.multiproc import run_ranks

LOGITS_ATOL = 1e-5


def _logits_from_converted(rank, world, mm_dir, tied):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch
    from megatron.core import parallel_state as ps

    from checkpoint.megatron_io import find_layout, load_rank
    from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
    from mindspeed_mm.models.qwen2vl.model import Qwen2VLModel
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import VOCAB, hf_config, hf_forward, hf_model, make_batch

    layout = find_layout(mm_dir)
    init_distributed(platform, layout.tp_size, layout.pp_size, seed=1)
    cfg = Qwen2VLConfig.load(mm_dir)  # the converted checkpoint describes itself
    model = Qwen2VLModel(cfg, tensor_parallel=layout.tp_size, stage_layers=[cfg.text.num_layers]).eval()
    state = load_rank(layout.rank_file(ps.get_tensor_model_parallel_rank(), 0), mmap=False)
    model.load_state_dict(state, strict=True)
    hf = hf_model(hf_config(tie_word_embeddings=tied))
    batch = make_batch("right")
    with torch.no_grad():
        ref = hf_forward(hf, batch, with_labels=False).logits
        shard = model(batch["input_ids"], None, batch["attention_mask"], batch["pixel_values"],
                      batch["image_grid_thw"])  # [b, s, padded_vocab / TP]
    pieces = [torch.empty_like(shard) for _ in range(layout.tp_size)]
    torch.distributed.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    logits = torch.cat(pieces, dim=-1)
    real = batch["attention_mask"].bool()
    result = dict(diff=float((logits[..., :VOCAB] - ref)[real].abs().max()),
                  padded=float(logits[..., VOCAB:].max()), columns=logits.shape[-1],
                  want_columns=cfg.text.padded_vocab_size(layout.tp_size))
    destroy_distributed()
    return result


@pytest.mark.parametrize("tp,tied", [(1, False), (2, True)])
def test_converted_checkpoint_gives_hf_logits(tmp_path, tp, tied):
    from checkpoint.convert import convert_hf_to_mm
    from tests.hf_reference import hf_config, hf_model

    hf_model(hf_config(tie_word_embeddings=tied)).save_pretrained(tmp_path / "hf")
    convert_hf_to_mm(str(tmp_path / "hf"), str(tmp_path / "mm"), tensor_parallel_size=tp,
                     pipeline_layer_index=[0], progress=False)
    for r in run_ranks(_logits_from_converted, tp, timeout=300, mm_dir=str(tmp_path / "mm"), tied=tied):
        assert r["diff"] < LOGITS_ATOL, r
        assert r["columns"] == r["want_columns"] and r["padded"] == float("-inf"), r
