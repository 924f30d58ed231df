"""Pipeline layout and recompute settings: the guide's split, and one-line errors for bad flags."""
import pytest

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.parallel import ParallelSettings, megatron_layout, stage_layer_counts


def test_guide_pipeline_layer_index_gives_embedding_only_first_stage():
    counts = stage_layer_counts(28, pipeline_layer_index=[0, 0, 10, 20])
    assert counts == [0, 10, 10, 8]
    layout = megatron_layout(counts)
    assert layout[0] == ["embedding"]
    assert [row.count("decoder") for row in layout] == counts
    assert layout[-1][-1] == "loss" and sum(row.count("loss") for row in layout) == 1
    assert ParallelSettings(stage_layers=counts).pipeline_parallel == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(recompute_granularity="full"), "needs --recompute-method"),
    (dict(recompute_granularity="selective", recompute_method="block"), "applies only with"),
    (dict(recompute_granularity="partial"), "must be full or selective"),
    (dict(recompute_granularity="full", recompute_method="every", recompute_num_layers=1), "uniform or block"),
    (dict(sequence_parallel=True), "needs --tensor-model-parallel-size > 1"),
])
def test_bad_recompute_or_parallel_flags_fail_in_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        ParallelSettings(**kwargs).validate()


def test_stage_layers_must_cover_the_model():
    with pytest.raises(UserError, match="summing to 28"):
        ParallelSettings(stage_layers=[10, 10, 10]).resolved_stage_layers(28)
    assert ParallelSettings().resolved_stage_layers(28) == [28]
