import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regrow.core.density import allocate_counts, layer_densities

shape_2d = st.tuples(st.integers(1, 300), st.integers(1, 300))
shape_4d = st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3, 5]), st.sampled_from([1, 3]))
shapes_st = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=6), st.one_of(shape_2d, shape_4d),
                            min_size=1, max_size=6)


@given(shapes=shapes_st, density=st.floats(0.001, 1.0), dist=st.sampled_from(["uniform", "er", "erk"]))
def test_counts_hit_the_target_exactly(shapes, density, dist):
    counts = allocate_counts(shapes, density, dist)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    target = round(density * sum(numel.values()))
    assert set(counts) == set(shapes)
    for n, c in counts.items():
        assert 1 <= c <= numel[n]
    # exact unless there are fewer weights to give than layers (each layer keeps at least one)
    if target >= len(shapes):
        assert sum(counts.values()) == target
    # each layer is within one weight of its real-valued share, except the donors that gave
    # one weight to a layer whose share rounded to zero
    share = {n: d * numel[n] for n, d in layer_densities(shapes, density, dist).items()}
    lifted = sum(1 for n in shapes if share[n] < 1 and counts[n] == 1)
    far = sum(1 for n in shapes if abs(counts[n] - share[n]) >= 1)
    assert far <= lifted

def test_erk_makes_saturated_layers_dense_and_rescales():
    # a tiny first layer would need density > 1 under ERK at 50%: it becomes dense
    shapes = {"first": (8, 3), "big": (512, 512), "mid": (64, 512)}
    d = layer_densities(shapes, 0.2, "erk")
    assert d["first"] == 1.0
    total = sum(d[n] * math.prod(s) for n, s in shapes.items())
    assert total == pytest.approx(0.2 * sum(math.prod(s) for s in shapes.values()))
    assert d["big"] < d["mid"] < 1.0


def test_er_ignores_kernel_size_but_erk_does_not():
    shapes = {"conv": (16, 16, 3, 3), "fc": (16, 16)}
    er = layer_densities(shapes, 0.2, "er")
    erk = layer_densities(shapes, 0.2, "erk")
    assert er["conv"] == pytest.approx(er["fc"])
    assert erk["conv"] < erk["fc"]


def test_uniform_gives_every_layer_the_same_density():
    shapes = {"a": (100, 100), "b": (50, 200)}
    assert allocate_counts(shapes, 0.1, "uniform") == {"a": 1000, "b": 1000}


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_bad_density(bad):
    with pytest.raises(ValueError, match="density"):
        layer_densities({"a": (4, 4)}, bad, "erk")


def test_unknown_distribution_lists_valid_ones():
    with pytest.raises(ValueError, match="uniform, er, erk"):
        allocate_counts({"a": (4, 4)}, 0.5, "gaussian")
