"""The built-in community graph, the link-prediction metrics and a sparse GCN run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from regrow.data.graphs import community_graph, hits_at_k, normalized_adjacency, roc_auc
from regrow.experiments.linkpred import train_link_prediction

SMALL = dict(num_nodes=240, communities=6, average_degree=10.0, feature_dim=16)


def _keys(edges: torch.Tensor, n: int) -> set[int]:
    return set((edges[0] * n + edges[1]).tolist())


def test_graph_split_is_disjoint_reproducible_and_negatives_are_non_edges():
    g = community_graph(**SMALL, seed=3)
    n = g.num_nodes
    train, val, test = (_keys(e, n) for e in (g.train_edges, g.val_edges, g.test_edges))
    assert not (train & val or train & test or val & test)
    negatives = _keys(g.val_negatives, n) | _keys(g.test_negatives, n)
    assert len(negatives) == g.val_negatives.shape[1] + g.test_negatives.shape[1]   # distinct
    assert not negatives & (train | val | test)
    for e in (g.train_edges, g.val_edges, g.test_edges, g.val_negatives, g.test_negatives):
        assert bool((e[0] < e[1]).all())
    again = community_graph(**SMALL, seed=3)
    assert torch.equal(again.train_edges, g.train_edges) and torch.equal(again.features, g.features)
    assert not torch.equal(community_graph(**SMALL, seed=4).train_edges, g.train_edges)


def test_graph_has_the_community_structure_asked_for():
    g = community_graph(num_nodes=1200, communities=10, average_degree=12.0, mixing=0.1, seed=0)
    edges = torch.cat([g.train_edges, g.val_edges, g.test_edges], dim=1)
    inside = (g.communities[edges[0]] == g.communities[edges[1]]).float().mean().item()
    assert inside == pytest.approx(0.9, abs=0.03)
    assert 2 * edges.shape[1] / g.num_nodes == pytest.approx(12.0, rel=0.15)


def test_normalized_adjacency_matches_the_dense_formula():
    g = community_graph(**SMALL, seed=1)
    n = g.num_nodes
    a = torch.zeros(n, n)
    a[g.train_edges[0], g.train_edges[1]] = 1
    a = a + a.T + torch.eye(n)
    d = a.sum(1).rsqrt()
    expected = d[:, None] * a * d[None, :]
    assert torch.allclose(normalized_adjacency(g.train_edges, n).to_dense(), expected, atol=1e-6)


def test_metrics_against_independent_computations():
    rng = np.random.default_rng(0)
    pos = torch.tensor(rng.normal(1.0, 1.0, 300).round(1))   # rounded: ties occur
    neg = torch.tensor(rng.normal(0.0, 1.0, 500).round(1))
    labels = np.r_[np.ones(300), np.zeros(500)]
    assert roc_auc(pos, neg) == pytest.approx(roc_auc_score(labels, np.r_[pos.numpy(), neg.numpy()]), abs=1e-9)
    kth = np.sort(neg.numpy())[::-1][49]
    assert hits_at_k(pos, neg, 50) == pytest.approx(float((pos.numpy() > kth).mean()))


@pytest.mark.slow
def test_sparse_gcn_learns_links_and_stays_sparse():
    g = community_graph(**SMALL, seed=0)
    out = train_link_prediction("dstee", 0.9, epochs=8, hidden=32, batch_size=256, update_interval=4, graph=g)
    assert out["density"] == pytest.approx(0.1, abs=0.01)
    assert out["updates"] >= 2 and out["itop_rate"] > 0.1
    assert out["test_auc"] > 0.75    # chance is 0.5
