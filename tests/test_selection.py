import torch
from hypothesis import given
from hypothesis import strategies as st

from regrow.core.selection import largest_k, smallest_k


@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=60), data=st.data())
def test_largest_k_matches_a_stable_sort(values, data):
    k = data.draw(st.integers(0, len(values)))
    scores = torch.tensor(values, dtype=torch.float32)
    expected = sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])
    assert largest_k(scores, k).tolist() == expected
    expected_small = sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[:k])
    assert smallest_k(scores, k).tolist() == expected_small


def test_ties_go_to_lower_positions():
    scores = torch.tensor([1.0, 5.0, 5.0, 5.0, 0.0])
    assert largest_k(scores, 2).tolist() == [1, 2]
    assert smallest_k(torch.zeros(6), 3).tolist() == [0, 1, 2]
