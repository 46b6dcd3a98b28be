"""Cannistraci-Hebb link prediction (CH3-L3) on one layer's bipartite graph of active links.

A layer is a bipartite graph: output neuron o -- input neuron a for every active weight. For a
missing link (o, i), each path of length 3, o - a - b - i (a an input of o, b an output fed by
both a and i), adds 1 / sqrt((1 + de(a)) (1 + de(b))), where de is a node's *external* degree:
its links that leave the local community (the inner nodes of all such paths) and do not touch
the seeds o, i. In a bipartite graph this is, exactly (Cannistraci-Hebb path-based CH3-L3, as
in the authors' ``CH_scores_new_v2.cpp``):

    de(a) = deg(a) - 1 - |N(a) & N(i)|     (the link to o; the links to outputs fed by i)
    de(b) = deg(b) - 1 - |N(b) & N(o)|     (the link to i; the links to inputs of o)

Work and memory are O(number of length-3 paths) = O(E * d_in * d_out) for E active links of
typical degrees d: linear in the number of neurons at a fixed degree, never rows x cols x rows;
paths are enumerated in chunks. Only candidates with at least one path are returned.

At moderate density (a few percent and up) on a layer small enough for a rows x cols table,
the same sum is a product of two matrices over the active links e = (b, a):
score(o, i) = sum_e [A(o, a) g(b, o)] [A(b, i) f(a, i)] with f(a, i) = (1 + de(a))^-1/2 and
g(b, o) = (1 + de(b))^-1/2, which BLAS does far faster than enumerating the paths one by one
(784 x 300 at 7.7% density: 25M paths). ``ch3_l3_scores`` picks that route when its flops are
cheaper by the measured ratio ``MATMUL_SPEEDUP``; both give the same scores.
"""
from __future__ import annotations

import torch

PATH_CHUNK = 1 << 22   # paths scored at a time (memory bound, ~10 int64 arrays of this size)
DENSE_TABLE = 1 << 24  # co-degree tables up to this many entries are dense (a gather per lookup)
BLOCK_ENTRIES = 1 << 23  # outputs x inputs of one block's score accumulator
MATMUL_SPEEDUP = 2000    # float64 matmul flops per enumerated path at equal time (measured, 1 core)
MATMUL_CHUNK = 1 << 22   # entries of one link chunk's factor matrices in the matmul route


def _expand(ptr: torch.Tensor, deg: torch.Tensor, members: torch.Tensor, nodes: torch.Tensor):
    """For each entry of ``nodes``, all its neighbours: (position of the entry, neighbour)."""
    sizes = deg[nodes]
    src = torch.repeat_interleave(torch.arange(nodes.numel()), sizes)
    first = torch.cumsum(sizes, 0) - sizes
    offset = torch.arange(src.numel()) - torch.repeat_interleave(first, sizes)
    return src, members[ptr[nodes][src] + offset]


class _CoDegree:
    """|N(x) & N(y)| for nodes x, y of one side: how many groups (neighbours) hold both."""

    def __init__(self, ptr, deg, members, n_groups: int, n_members: int):
        groups = torch.arange(n_groups)
        g, y = _expand(ptr, deg, members, torch.repeat_interleave(groups, deg[groups]))
        keys = members[g] * n_members + y        # every ordered pair of members of each group
        self.n = n_members
        if n_members * n_members <= DENSE_TABLE:
            self.table = torch.bincount(keys, minlength=n_members * n_members)
            self.keys = None
        else:
            self.keys, self.table = torch.unique(keys, return_counts=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        query = x * self.n + y
        if self.keys is None:
            return self.table[query]
        pos = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        return torch.where(self.keys[pos] == query, self.table[pos], 0)


def ch3_l3_scores(active: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CH3-L3 scores of every missing link that closes a length-3 path.

    Args:
        active: sorted flat indices ``o * cols + a`` of the active links (CPU int64).
    Returns:
        (flat indices of the scored missing links, ascending; their float64 scores).
    """
    active = active.cpu()
    out_of, in_of = active // cols, active % cols
    deg_out = torch.bincount(out_of, minlength=rows)     # inputs per output neuron
    deg_in = torch.bincount(in_of, minlength=cols)       # outputs per input neuron
    row_ptr = torch.cumsum(deg_out, 0) - deg_out         # CSR: inputs of each output
    by_col = torch.sort(in_of * rows + out_of).values    # CSC: outputs of each input
    col_ptr = torch.cumsum(deg_in, 0) - deg_in
    col_members = by_col % rows
    common_outputs = _CoDegree(row_ptr, deg_out, in_of, rows, cols)       # of two inputs
    common_inputs = _CoDegree(col_ptr, deg_in, col_members, cols, rows)   # of two outputs

    # paths o - a - b - i, by blocks of output neurons o holding about PATH_CHUNK paths; a path
    # with b == o or i == a ends on an active link (o, i) and is discarded with it at the end
    fan = torch.zeros(cols, dtype=torch.long).index_add_(0, in_of, deg_out[out_of])   # per input a
    per_row = torch.zeros(rows, dtype=torch.long).index_add_(0, out_of, fan[in_of])
    if rows * cols <= DENSE_TABLE and 2 * rows * cols * active.numel() < MATMUL_SPEEDUP * int(per_row.sum()):
        return _scores_by_matmul(active, rows, cols, deg_out, deg_in)
    found_keys, found_scores, lo = [], [], 0
    while lo < rows:
        hi = _block_end(per_row, lo, max(1, BLOCK_ENTRIES // cols))
        links = slice(int(row_ptr[lo]), int(row_ptr[hi - 1] + deg_out[hi - 1]))
        o, a = out_of[links], in_of[links]
        src, b = _expand(col_ptr, deg_in, col_members, a)
        o, a = o[src], a[src]
        src, i = _expand(row_ptr, deg_out, in_of, b)
        o, a, b = o[src], a[src], b[src]
        de_a = deg_in[a] - 1 - common_outputs(a, i)
        de_b = deg_out[b] - 1 - common_inputs(b, o)
        score = ((1 + de_a).double() * (1 + de_b).double()).rsqrt()
        block = torch.zeros((hi - lo) * cols, dtype=torch.float64)
        block.index_add_(0, (o - lo) * cols + i, score)
        block[active[links] - lo * cols] = 0            # links already active are not candidates
        keys = block.nonzero().squeeze(1)
        found_keys.append(keys + lo * cols)
        found_scores.append(block[keys])
        lo = hi
    if not found_keys:
        return active[:0], torch.zeros(0, dtype=torch.float64)
    return torch.cat(found_keys), torch.cat(found_scores)


def _scores_by_matmul(active, rows, cols, deg_out, deg_in):
    """The same scores as the path enumeration, as sum over active links e = (b, a) of
    U(o, e) V(e, i) (see the module docstring); a rows x cols accumulator."""
    adj = torch.zeros(rows * cols, dtype=torch.float64)
    adj[active] = 1.0
    adj = adj.view(rows, cols)
    # 1 + de(a) for the pair (a, i) is deg(a) - |N(a) & N(i)|; it is 0 only when a == i-like
    # degenerate pairs end on active links, whose scores are discarded: 0 there, not inf
    # (an inf would turn the products with zeros into NaN).
    f = _inv_sqrt(deg_in.double().unsqueeze(1) - adj.T @ adj)          # [a, i]
    g = _inv_sqrt(deg_out.double().unsqueeze(1) - adj @ adj.T)         # [b, o]
    b_of, a_of = active // cols, active % cols
    score = torch.zeros(rows, cols, dtype=torch.float64)
    step = max(1, MATMUL_CHUNK // max(rows, cols))
    for lo in range(0, active.numel(), step):
        b, a = b_of[lo:lo + step], a_of[lo:lo + step]
        u = adj[:, a] * g[b].T                                             # [o, e]
        v = adj[b] * f[a]                                                  # [e, i]
        score.addmm_(u, v)
    score = score.view(-1)
    score[active] = 0                                 # links already active are not candidates
    keys = score.nonzero().squeeze(1)
    return keys, score[keys]


def _inv_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x.clamp(min=1).rsqrt(), torch.zeros((), dtype=x.dtype))


def _block_end(per_row: torch.Tensor, lo: int, max_rows: int) -> int:
    """End of the block of outputs from ``lo``: at most ``max_rows`` outputs and, beyond its
    first output, at most PATH_CHUNK paths."""
    total = torch.cumsum(per_row[lo:lo + max_rows], 0)
    return lo + max(1, int(torch.searchsorted(total, PATH_CHUNK, right=True)))
