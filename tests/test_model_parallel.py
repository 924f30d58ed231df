"""Our Qwen2-VL split over gloo processes computes HF's logits and loss.

TP=2 (ViT heads and LLM heads/vocab split), PP=2 with an empty-LLM first
stage (ViT + projector + embedding only) and a tied head, and TP=2 x PP=2 with
an uneven split and sequence parallelism; the pipeline runs through megatron-core's own schedule and every stage
computes the M-RoPE positions itself (position_ids=None).  The tiny config
has 4 query heads over 2 KV heads and M-RoPE sections [2, 3, 3], so a wrong
head, group or section split cannot pass by symmetry.
"""
from tests.multiproc import run_ranks

LOGITS_ATOL = 1e-5
LOSS_RTOL = 1e-5


def _parallel_forward(rank, world, tp, stage_layers, padding_side, tied=False, sequence_parallel=False):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import (VOCAB, build_our_model, hf_config, hf_forward, hf_model, make_batch,
                                    shift_labels)

    init_distributed(platform, tp, len(stage_layers), seed=1)
    hf = hf_model(hf_config(tie_word_embeddings=tied))
    batch = make_batch(padding_side, pad_to_multiple=tp if sequence_parallel else 1)
    with torch.no_grad():
        ref = hf_forward(hf, batch)
    model = build_our_model(hf, tensor_parallel=tp, stage_layers=stage_layers, sequence_parallel=sequence_parallel,
                            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    model.eval()
    labels = shift_labels(batch["labels"])

    def run(with_labels):
        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = model(b["input_ids"], None, b["attention_mask"], b["pixel_values"], b["image_grid_thw"],
                        labels=labels if with_labels else None)
            return out, lambda o: (o.float().sum(), {"out": o.detach()})

        seq = batch["input_ids"].shape[1]
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=seq, micro_batch_size=batch["input_ids"].shape[0], forward_only=True)

    logits_out, loss_out = run(False), run(True)
    result = None
    if ps.is_pipeline_last_stage():
        shard = logits_out[0]["out"]  # [b, s, V/TP]
        pieces = [torch.empty_like(shard) for _ in range(tp)]
        torch.distributed.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(pieces, dim=-1)
        real = batch["attention_mask"].bool()
        loss = loss_out[0]["out"].sum() / (labels != -100).sum()
        result = dict(logits_diff=float((logits[..., :VOCAB] - ref.logits)[real].abs().max()),
                      padded_columns=float(logits[..., VOCAB:].max()), vocab_columns=logits.shape[-1],
                      loss=float(loss), hf_loss=float(ref.loss))
    destroy_distributed()
    return result


def _check(results, padded_vocab):
    last = [r for r in results if r is not None]
    assert last, "no last-stage result"
    for r in last:
        assert r["logits_diff"] < LOGITS_ATOL, r
        assert r["vocab_columns"] == padded_vocab and r["padded_columns"] == float("-inf"), r
        assert abs(r["loss"] - r["hf_loss"]) <= LOSS_RTOL * abs(r["hf_loss"]), r


def test_tp2_left_padding():
    _check(run_ranks(_parallel_forward, 2, timeout=300, tp=2, stage_layers=[3], padding_side="left"), 2304)


def test_pp2_empty_llm_first_stage_tied_embeddings():
    # stage 0: ViT + projector + embedding only; stage 1: all 3 LLM layers + the tied head's copy
    _check(run_ranks(_parallel_forward, 2, timeout=300, tp=1, stage_layers=[0, 3], padding_side="right",
                     tied=True), 2176)


def test_tp2_pp2_uneven_sequence_parallel():
    _check(run_ranks(_parallel_forward, 4, timeout=400, tp=2, stage_layers=[2, 1], padding_side="right",
                     sequence_parallel=True), 2304)
