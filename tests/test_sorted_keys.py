"""Sorted key vectors: merges are set unions, and sorted draws are i.i.d. uniform draws."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regrow.core.sorted_keys import merge_sorted, sorted_uniform_draws, union_sorted

keys = st.sets(st.integers(0, 10**12), max_size=60)


def as_tensor(values) -> torch.Tensor:
    return torch.tensor(sorted(values), dtype=torch.long)


@settings(max_examples=50, deadline=None)
@given(keys, keys)
def test_merge_sorted_is_the_sorted_union_of_disjoint_sets(a, b):
    b = b - a
    assert merge_sorted(as_tensor(a), as_tensor(b)).tolist() == sorted(a | b)


@settings(max_examples=50, deadline=None)
@given(keys, keys)
def test_union_sorted_is_the_sorted_union_of_overlapping_sets(a, b):
    assert union_sorted(as_tensor(a), as_tensor(b)).tolist() == sorted(a | b)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 50), cols=st.integers(1, 10**7), n=st.integers(0, 3000), seed=st.integers(0, 99))
def test_sorted_draws_are_sorted_in_range_and_reproducible(rows, cols, n, seed):
    draws = sorted_uniform_draws(rows, cols, n, torch.Generator().manual_seed(seed))
    assert draws.numel() == n and draws.dtype == torch.long
    if n:
        assert bool((draws[1:] >= draws[:-1]).all())
        assert 0 <= int(draws[0]) and int(draws[-1]) < rows * cols
    again = sorted_uniform_draws(rows, cols, n, torch.Generator().manual_seed(seed))
    assert torch.equal(draws, again)


def test_sorted_draws_are_uniform_over_the_grid():
    """Cell counts of 420,000 draws on a 6 x 7 grid: each within 5 sigma of 10,000, and the
    chi-square statistic (41 degrees of freedom) below its 99.99th percentile (~85)."""
    rows, cols, n = 6, 7, 420_000
    counts = torch.bincount(sorted_uniform_draws(rows, cols, n, torch.Generator().manual_seed(3)),
                            minlength=rows * cols).double()
    expected = n / (rows * cols)
    sigma = (expected * (1 - 1 / (rows * cols))) ** 0.5
    assert float((counts - expected).abs().max()) < 5 * sigma
    assert float(((counts - expected) ** 2 / expected).sum()) < 85


def test_sorted_draws_columns_are_uniform_within_a_wide_row():
    """One row, many columns: the column of a draw must be uniform (deciles of 200,000 draws
    each hold 10% +- 0.5%), which checks the order-statistics construction itself."""
    cols = 10**9
    draws = sorted_uniform_draws(1, cols, 200_000, torch.Generator().manual_seed(5))
    deciles = torch.bincount(draws * 10 // cols, minlength=10).double() / draws.numel()
    assert float((deciles - 0.1).abs().max()) < 0.005
