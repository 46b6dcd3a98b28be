"""A small graph convolutional network for link prediction (Kipf & Welling 2017 encoder).

``GCNLinkPredictor``: two graph convolutions ``H' = relu(A_hat H W)`` (``W`` an ``nn.Linear``,
so DynamicSparsity sparsifies it like any other layer) encode the nodes; a pair (u, v) is
scored by a two-layer MLP on ``h_u * h_v``, the predictor of the OGB link-prediction
baselines. Written with plain torch (a sparse ``A_hat``), so no graph library is needed.
"""
from __future__ import annotations

import torch
from torch import nn


class GCNLinkPredictor(nn.Module):
    """GCN encoder + Hadamard-product MLP link predictor.

    Args:
        in_features: node feature size.
        hidden: width of the encoder and of the predictor's hidden layer.
        dropout: dropout on the encoder's hidden features.
    """

    def __init__(self, in_features: int, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Linear(in_features, hidden)
        self.conv2 = nn.Linear(hidden, hidden)
        self.predictor = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.dropout = nn.Dropout(dropout)

    def encode(self, features: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """Node embeddings after two propagation steps over ``adjacency`` (normalised, sparse)."""
        h = torch.relu(adjacency @ self.conv1(features))
        return adjacency @ self.conv2(self.dropout(h))

    def score(self, embeddings: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Logits of the node pairs ``pairs`` [2, P]."""
        return self.predictor(embeddings[pairs[0]] * embeddings[pairs[1]]).squeeze(-1)

    def forward(self, features: torch.Tensor, adjacency: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return self.score(self.encode(features, adjacency), pairs)
