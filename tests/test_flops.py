"""FLOPs accounting checked against numbers computed by hand."""
import math

import pytest
import torch
from torch import nn

from regrow import DynamicSparsity
from regrow.experiments.flops import (LayerFlops, TrainFlops, growth_cost, gse_subset_fraction, measure_layer_flops,
                          step_flops)


class Tiny(nn.Module):
    """conv 1->2 (3x3) on 1x5x5 -> 2x3x3, flatten 18 -> linear 18->4 -> linear 4->3."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc1 = nn.Linear(18, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def test_layer_flops_by_hand():
    lf = measure_layer_flops(Tiny(), (1, 5, 5))
    # conv: 2*3*3 outputs, each 1*3*3 multiply-adds; linears: in*out
    assert lf.per_param == {"conv.weight": 18 * 9, "fc1.weight": 18 * 4, "fc2.weight": 4 * 3}
    assert lf.dense == 162 + 72 + 12 == 246
    assert lf.forward({"conv.weight": 0.5, "fc1.weight": 0.25}) == pytest.approx(81 + 18 + 12)


def test_grouped_conv_and_sequence_linear():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2, padding=1))   # out 4x6, each 2*3 MACs
    assert measure_layer_flops(model, (4, 6)).per_param == {"0.weight": 24 * 6}
    seq = nn.Sequential(nn.Linear(5, 7))                               # applied to 3 positions
    assert measure_layer_flops(seq, (3, 5)).per_param == {"0.weight": 3 * 35}


def test_attention_projections_and_products():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    lf = measure_layer_flops(Attn(), (5, 8))     # 5 tokens of width 8
    assert lf.per_param == {"attn.in_proj_weight": 3 * 5 * 64, "attn.out_proj.weight": 5 * 64}
    assert lf.other == 2 * 5 * 5 * 8


def test_measuring_keeps_mode_and_rng():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model.train()
    before = torch.get_rng_state()
    measure_layer_flops(model, (3,))
    assert model.training and torch.equal(before, torch.get_rng_state())


def test_step_costs_by_hand():
    lf = LayerFlops({"a": 100.0, "b": 20.0}, other=5.0)
    d = {"a": 0.1, "b": 0.5}
    f_s, f_d = 5 + 10 + 10, 125.0
    assert step_flops(lf, d) == 3 * f_s
    assert step_flops(lf, d, "dense_grad") == 2 * f_s + f_d
    assert step_flops(lf, d, "subset_grad", {"a": 0.1, "b": 0.5}) == 3 * f_s + 10 + 10
    with pytest.raises(ValueError, match="unknown growth cost"):
        step_flops(lf, d, "magic")


def test_rigl_average_matches_paper_formula():
    """Updates every dT steps give RigL's (3 f_S dT' + 2 f_S + f_D) / (dT' + 1), dT' = dT - 1."""
    lf = LayerFlops({"a": 1000.0})
    d = {"a": 0.05}
    f_s, f_d, dt = 50.0, 1000.0, 10
    meter = TrainFlops(lf)
    for t in range(1, 10 * dt + 1):
        meter.add_step(d, batch=8, growth="dense_grad" if t % dt == 0 else "none")
    paper = (3 * f_s * (dt - 1) + 2 * f_s + f_d) / dt
    assert meter.ratio == pytest.approx(paper / (3 * f_d))
    assert meter.end_epoch() == pytest.approx(meter.ratio) and meter.per_epoch == [meter.ratio]


def test_meter_state_round_trip():
    lf = LayerFlops({"a": 10.0})
    meter = TrainFlops(lf)
    meter.add_step({"a": 0.5}, 4)
    meter.end_epoch()
    meter.add_step({"a": 0.2}, 4)
    copy = TrainFlops(lf)
    copy.load_state_dict(meter.state_dict())
    assert copy.state_dict() == meter.state_dict()
    assert copy.end_epoch() == pytest.approx(0.2)


def test_gse_subset_fraction():
    # N=10 active of 100, gamma=2 -> |S|=20; k = floor(0.3*10)=3 < 20
    assert gse_subset_fraction(10, 100, 2.0, 0.3) == pytest.approx(0.2)
    # capped by the 5 inactive
    assert gse_subset_fraction(95, 100, 1.0, 0.3) == pytest.approx(0.05)
    # never below k
    assert gse_subset_fraction(10, 100, 0.1, 0.3) == pytest.approx(3 / 100)
    assert gse_subset_fraction(10, 100, 0.25, 0.3) == pytest.approx(math.ceil(2.5) / 100)


@pytest.mark.parametrize("method,expected", [("dense", "none"), ("static", "none"), ("set", "none"),
                                             ("gmp", "none"), ("rigl", "dense_grad"), ("dstee", "dense_grad"),
                                             ("srigl", "dense_grad"), ("gse", "subset_grad")])
def test_growth_cost_per_method(method, expected):
    model = nn.Sequential(nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = DynamicSparsity(model, opt, method=method, sparsity=0.0 if method == "dense" else 0.5,
                          total_steps=100, update_interval=10)
    assert growth_cost(dst.method) == expected
