"""A deterministic train / validation / test split of one dataset (Megatron's ``--split``)."""
import numpy as np
import torch

from mindspeed_mm.errors import UserError


class DatasetSplit(torch.utils.data.Dataset):
    """The samples of ``base`` at ``indices``; keeps the attributes the data loader reads."""

    def __init__(self, base, indices):
        self.base, self.indices = base, [int(i) for i in indices]
        self.pad_token_id = base.pad_token_id

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]

    def sample_sizes(self):
        lengths, patches = self.base.sample_sizes()
        return lengths[self.indices], patches[self.indices]


def split_dataset(dataset, fractions, seed: int):
    """(train, valid or None).  Held-out samples are drawn by a seeded permutation; the
    training samples keep their original order (the sampler shuffles them)."""
    n = len(dataset)
    if fractions[1] == 0 and fractions[2] == 0:
        return dataset, None
    n_valid = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
    n_test = round(n * fractions[2])
    n_train = n - n_valid - n_test
    if n_train < 1:
        raise UserError(f"--split: {n} usable samples leave none for training "
                        f"({n_valid} validation, {n_test} test)")
    order = np.random.default_rng([seed, 2]).permutation(n)
    train = DatasetSplit(dataset, np.sort(order[:n_train]))
    valid = DatasetSplit(dataset, np.sort(order[n_train:n_train + n_valid])) if n_valid else None
    return train, valid
