"""Next-token rules equal transformers' logits processors; sampling repeats with its seed."""
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from mindspeed_mm.inference.arguments import GenerationSettings
from mindspeed_mm.inference.sampling import next_tokens, repetition_penalty, top_k_filter, top_p_filter

B, V = 4, 300


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    history = torch.randint(0, V, (B, 17), generator=g)
    return logits, history


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_is_hf(penalty):
    logits, history = _inputs()
    expect = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    assert torch.equal(repetition_penalty(logits, history, penalty), expect)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_is_hf(k):
    logits, history = _inputs(1)
    assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(history, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_top_p_is_hf(p):
    logits, history = _inputs(2)
    ours = top_p_filter(logits, p)
    assert torch.equal(ours, TopPLogitsWarper(p)(history, logits.clone()))
    assert bool((ours > float("-inf")).any(-1).all())


def test_sampling_pipeline_and_seed():
    logits, history = _inputs(3)
    s = GenerationSettings(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.2, seed=5)
    hf = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8)):
        hf = proc(history, hf)
    allowed = hf > float("-inf")

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([next_tokens(logits, history, s, g) for _ in range(30)])  # [30, B]

    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(allowed.gather(1, a.T).all())  # only tokens HF's filters keep are drawn
    greedy = next_tokens(logits, history, GenerationSettings(repetition_penalty=1.2))
    assert torch.equal(greedy, RepetitionPenaltyLogitsProcessor(1.2)(history, logits.clone()).argmax(-1))
