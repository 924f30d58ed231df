"""megatron-core's real engine on CPU/gloo: a small GPT built with the project's
layer spec trains 3 steps with a falling loss, single process, TP=2 x PP=2 and
DP=2 with the distributed optimizer."""
import pytest

from tests.multiproc import run_ranks

VOCAB, SEQ, MBS = 64, 16, 2


def _train_gpt(rank, world, tp=1, pp=1, distributed_optimizer=False, recompute=False, steps=3):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from mindspeed_mm.models.layer_spec import transformer_layer_spec
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed

    init_distributed(platform, tp, pp, seed=7)
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=True, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        recompute_granularity="full" if recompute else None, recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )
    model = GPTModel(config, transformer_layer_spec(), VOCAB, SEQ,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(), position_embedding_type="rope")
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer,
                                               grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, use_distributed_optimizer=distributed_optimizer, clip_grad=1.0),
        [model])

    # A fixed, memorisable batch: each data-parallel rank gets its own half.
    g = torch.Generator().manual_seed(0)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
    tokens = tokens.chunk(dp)[dp_rank]
    num_micro = tokens.shape[0] // MBS
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        labels = batch[:, 1:]
        out = model(batch[:, :-1], position_ids, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    losses = []
    for _ in range(steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(tokens.split(MBS)), model=[model],
            num_microbatches=num_micro, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        ok, _, _ = optimizer.step()
        assert ok
        if parallel_state.is_pipeline_last_stage():
            loss = torch.stack([o["loss"] for o in out]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append(float(loss) / dp)
    destroy_distributed()
    return losses


def _assert_falls(losses):
    assert len(losses) == 3, losses
    assert losses[0] > losses[1] > losses[2], losses
    assert losses[2] < 0.95 * losses[0], losses


def test_gpt_single_process():
    (losses,) = run_ranks(_train_gpt, 1, timeout=240)
    _assert_falls(losses)


def test_gpt_tp2_pp2_recompute():
    results = run_ranks(_train_gpt, 4, timeout=400, tp=2, pp=2, recompute=True)
    last_stage = [r for r in results if r]
    assert len(last_stage) == 2 and last_stage[0] == pytest.approx(last_stage[1])
    _assert_falls(last_stage[0])


def test_gpt_dp2_distributed_optimizer():
    results = run_ranks(_train_gpt, 2, timeout=300, distributed_optimizer=True)
    assert results[0] == pytest.approx(results[1])
    _assert_falls(results[0])
