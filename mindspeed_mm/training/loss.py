"""The language-model loss: a mean over every supervised token of the global batch.

Each micro-batch returns the *sum* of its token losses and its token count;
megatron-core (``config.calculate_per_token_loss``) then divides the gradients
by the token count of the whole global batch, all micro-batches and
data-parallel ranks together.  So a global batch of two samples with 3 and 30
supervised tokens weighs every token equally, exactly like the Hugging Face
model's loss on the same two samples, whatever the MBS x DP x accumulation
layout.
"""
import torch

from mindspeed_mm.constants import IGNORE_INDEX



def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[b, s] labels aligned with input_ids -> targets predicted at each position (-100 at the end)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in a batch of unshifted labels [b, s]."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def masked_loss_sum(per_token_loss: torch.Tensor, shifted_labels: torch.Tensor):
    """Megatron's loss_func: (sum of token losses, token count, {'lm loss': [sum, count]}).

    per_token_loss [b, s] float32 from the model (0 where the label is ignored).
    """
    mask = (shifted_labels != IGNORE_INDEX).float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def reduce_reported_loss(reports, group, device) -> torch.Tensor:
    """Sum the [loss_sum, tokens] of every micro-batch and data-parallel rank -> [2] float64."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for r in reports:
        total += r["lm loss"].to(total)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)
    return total
