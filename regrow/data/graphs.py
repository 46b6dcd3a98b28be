"""A built-in graph for link prediction: a seeded stochastic block model with node features.

No public graph can be downloaded here, so the GNN claims are measured on a generated one. A
stochastic block model (SBM) is chosen over a power-law cluster graph because it has the
property link prediction exploits, community structure: two nodes of one community link with
probability ``p_in``, of two communities with ``p_out << p_in``, so a model that learns which
nodes belong together can rank held-out links above non-links. Node degrees are made
heterogeneous (each node's link propensity is drawn from a log-normal, the degree-corrected
SBM of Karrer & Newman 2011), as in real graphs. Node features are a noisy projection of the
community (plus noise dimensions), so a feature-only model has partial information and message
passing adds the rest.

The edge split follows the OGB link-prediction datasets: held-out positive edges for
validation and test, each with as many sampled non-edges, and the metric is Hits@K (the
fraction of positive test edges scored above the K-th highest negative) plus ROC AUC.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinkPredictionSplits:
    """A graph and its link-prediction split (all tensors on the CPU).

    Attributes:
        features: [nodes, feature_dim] float32 node features.
        train_edges: [2, E_train] undirected training edges (each pair once, u < v).
        val_edges, test_edges: [2, E] held-out positive edges.
        val_negatives, test_negatives: [2, E] sampled node pairs that are not edges.
        communities: [nodes] the generating community of each node (for inspection only).
    """

    features: torch.Tensor
    train_edges: torch.Tensor
    val_edges: torch.Tensor
    val_negatives: torch.Tensor
    test_edges: torch.Tensor
    test_negatives: torch.Tensor
    communities: torch.Tensor
    name: str = "sbm"

    @property
    def num_nodes(self) -> int:
        return self.features.shape[0]


def community_graph(num_nodes: int = 2000, communities: int = 20, average_degree: float = 12.0,
                    mixing: float = 0.1, feature_dim: int = 32, feature_noise: float = 1.5,
                    val_fraction: float = 0.05, test_fraction: float = 0.1, seed: int = 0) -> LinkPredictionSplits:
    """A degree-corrected stochastic block model and its link-prediction split.

    Args:
        num_nodes, communities: graph size and number of equal-sized communities.
        average_degree: expected degree of a node.
        mixing: expected fraction of a node's links that leave its community.
        feature_dim: node feature size (half informative, half noise).
        feature_noise: standard deviation of the noise added to the community signal.
        val_fraction, test_fraction: fractions of the edges held out.
        seed: everything is a function of it.
    """
    if not 0.0 <= mixing < 1.0:
        raise ValueError(f"mixing must be in [0, 1), got {mixing}")
    if communities < 2 or num_nodes < 4 * communities:
        raise ValueError("need at least 2 communities and 4 nodes per community")
    gen = torch.Generator().manual_seed(int(seed))
    block = torch.arange(num_nodes) % communities
    block = block[torch.randperm(num_nodes, generator=gen)]
    propensity = torch.exp(0.5 * torch.randn(num_nodes, generator=gen))
    propensity = propensity / propensity.mean()
    size = num_nodes / communities
    p_in = average_degree * (1 - mixing) / (size - 1)
    p_out = average_degree * mixing / (num_nodes - size)
    u, v = torch.triu_indices(num_nodes, num_nodes, offset=1)
    same = block[u] == block[v]
    prob = torch.where(same, p_in, p_out) * propensity[u] * propensity[v]
    keep = torch.rand(prob.shape, generator=gen) < prob.clamp(max=1.0)
    edges = torch.stack([u[keep], v[keep]])
    edges = edges[:, torch.randperm(edges.shape[1], generator=gen)]

    n_val = int(round(val_fraction * edges.shape[1]))
    n_test = int(round(test_fraction * edges.shape[1]))
    test, val, train = edges[:, :n_test], edges[:, n_test:n_test + n_val], edges[:, n_test + n_val:]
    existing = set((edges[0] * num_nodes + edges[1]).tolist())
    negatives = _non_edges(num_nodes, existing, n_val + n_test, gen)

    centres = torch.randn(communities, feature_dim // 2, generator=gen)
    signal = centres[block] + feature_noise * torch.randn(num_nodes, feature_dim // 2, generator=gen)
    noise = torch.randn(num_nodes, feature_dim - feature_dim // 2, generator=gen)
    features = torch.cat([signal, noise], dim=1)
    return LinkPredictionSplits(features=features.float(), train_edges=train, val_edges=val,
                                val_negatives=negatives[:, :n_val], test_edges=test,
                                test_negatives=negatives[:, n_val:], communities=block)


def _non_edges(num_nodes: int, existing: set[int], count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` distinct node pairs u < v that are not edges (rejection sampling)."""
    found: list[int] = []
    seen = set(existing)
    while len(found) < count:
        a = torch.randint(num_nodes, (2 * count,), generator=gen)
        b = torch.randint(num_nodes, (2 * count,), generator=gen)
        for x, y in zip(torch.minimum(a, b).tolist(), torch.maximum(a, b).tolist()):
            key = x * num_nodes + y
            if x != y and key not in seen:
                seen.add(key)
                found.append(key)
                if len(found) == count:
                    break
    keys = torch.tensor(found, dtype=torch.long)
    return torch.stack([keys // num_nodes, keys % num_nodes])


def normalized_adjacency(edges: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` of the undirected ``edges`` as a coalesced sparse COO tensor (Kipf & Welling)."""
    loops = torch.arange(num_nodes)
    rows = torch.cat([edges[0], edges[1], loops])
    cols = torch.cat([edges[1], edges[0], loops])
    degree = torch.bincount(rows, minlength=num_nodes).float()
    values = degree[rows].rsqrt() * degree[cols].rsqrt()
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (num_nodes, num_nodes),
                                   check_invariants=True).coalesce()


def hits_at_k(positive: torch.Tensor, negative: torch.Tensor, k: int = 50) -> float:
    """OGB's Hits@K: the fraction of positive scores above the K-th highest negative score."""
    if negative.numel() < k:
        return float((positive > negative.max()).float().mean())
    threshold = torch.topk(negative, k).values[-1]
    return float((positive > threshold).float().mean())


def roc_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores = torch.cat([positive, negative])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=scores.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=scores.dtype).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
