"""Deterministic train/val/test split of in-memory tensors."""

import torch


def split_indices(num_samples: int, val_fraction: float, test_fraction: float, seed: int):
    """Returns disjoint index tensors ``(train, val, test)`` of a seeded permutation.

    Example:
        >>> train, val, test = split_indices(10, 0.2, 0.1, seed=0)
        >>> len(train), len(val), len(test)
        (7, 2, 1)
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"Expected `{name}` to be in [0, 1), but got {fraction!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "Expected `val_fraction + test_fraction` to be < 1 so that training data remains, "
            f"but got {val_fraction + test_fraction!r}."
        )
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    num_val = round(num_samples * val_fraction)
    num_test = round(num_samples * test_fraction)
    val = order[:num_val]
    test = order[num_val : num_val + num_test]
    train = order[num_val + num_test :]
    return train, val, test
