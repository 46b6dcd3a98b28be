"""Link prediction with a sparse-trained GCN (the DST-EE paper's GNN experiment, at CPU scale).

``train_link_prediction`` trains :class:`regrow.models.gcn.GCNLinkPredictor` on the built-in
community graph (:func:`regrow.data.graphs.community_graph`) with any method of
``regrow.METHODS`` sparsifying the GCN's two weight matrices (its fully connected layers; the
predictor stays dense, ``targets=`` changes that), and reports Hits@50 and ROC AUC on the
held-out edges. Each step scores a batch of training edges against as many random node pairs
(binary cross-entropy), with the node embeddings recomputed over the whole graph.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.graphs import LinkPredictionSplits, community_graph, hits_at_k, normalized_adjacency, roc_auc
from ..engine import DynamicSparsity
from ..models.gcn import GCNLinkPredictor

ENCODER_WEIGHTS = ("conv1.weight", "conv2.weight")


def train_link_prediction(method: str = "dstee", sparsity: float = 0.9, *, epochs: int = 30, seed: int = 0,
                          hidden: int = 128, lr: float = 0.01, batch_size: int = 1024,
                          distribution: str = "uniform", update_interval: int = 20, drop_fraction: float = 0.3,
                          targets: Sequence[str] = ENCODER_WEIGHTS, graph: LinkPredictionSplits | None = None,
                          k: int = 50, **method_options) -> dict:
    """Train one sparse GCN link predictor; returns its test/validation Hits@k and AUC.

    Args:
        method, sparsity, distribution, update_interval, drop_fraction, **method_options: as
            for :class:`regrow.DynamicSparsity` (uniform distribution, as the paper's GNN runs).
        epochs: passes over the training edges.
        targets: parameter names to sparsify (default: the GCN's two weight matrices).
        graph: the data (default: ``community_graph(seed=0)``, the same graph for every seed).
        k: the K of Hits@K.
    """
    graph = graph if graph is not None else community_graph(seed=0)
    torch.manual_seed(seed)
    model = GCNLinkPredictor(graph.features.shape[1], hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n_train = graph.train_edges.shape[1]
    steps_per_epoch = math.ceil(n_train / batch_size)
    dst = DynamicSparsity(model, optimizer, method=method, sparsity=sparsity, total_steps=epochs * steps_per_epoch,
                          distribution=distribution, update_interval=update_interval,
                          drop_fraction=drop_fraction, seed=seed, targets=list(targets), **method_options)
    adjacency = normalized_adjacency(graph.train_edges, graph.num_nodes)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        loss_sum = 0.0
        for start in range(0, n_train, batch_size):
            positive = graph.train_edges[:, order[start:start + batch_size]]
            negative = torch.randint(graph.num_nodes, positive.shape, generator=gen)
            optimizer.zero_grad(set_to_none=True)
            embeddings = model.encode(graph.features, adjacency)
            logits = model.score(embeddings, torch.cat([positive, negative], dim=1))
            labels = torch.cat([torch.ones(positive.shape[1]), torch.zeros(negative.shape[1])])
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {dst.step_count + 1}")
            loss.backward()
            dst.step()
            loss_sum += float(loss.detach()) * positive.shape[1]
        history.append({"epoch": epoch + 1, "loss": loss_sum / n_train, **dst.stats()})
    val, test = evaluate_links(model, graph, adjacency, k)
    stats = dst.stats()
    return {"method": method, "sparsity": sparsity, "seed": seed, f"test_hits@{k}": test["hits"],
            "test_auc": test["auc"], f"val_hits@{k}": val["hits"], "val_auc": val["auc"],
            "density": stats["density"], "itop_rate": stats["itop_rate"], "updates": stats["updates"],
            "final_loss": history[-1]["loss"], "epochs": epochs}


@torch.no_grad()
def evaluate_links(model: GCNLinkPredictor, graph: LinkPredictionSplits, adjacency: torch.Tensor,
                   k: int = 50) -> tuple[dict, dict]:
    """({"hits", "auc"} on the validation edges, the same on the test edges)."""
    model.eval()
    embeddings = model.encode(graph.features, adjacency)
    out = []
    for positive, negative in ((graph.val_edges, graph.val_negatives), (graph.test_edges, graph.test_negatives)):
        pos, neg = model.score(embeddings, positive), model.score(embeddings, negative)
        out.append({"hits": hits_at_k(pos, neg, k), "auc": roc_auc(pos, neg)})
    model.train()
    return out[0], out[1]
