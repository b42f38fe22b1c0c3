"""Routing as counts: who sends how many rows to whom (input of `pplx.sim.model`).

R ranks, E experts, E_local = E / R experts per rank (contiguous blocks, as in pplx.moe),
T tokens per rank, K experts per token.

Generators draw expert indices per token without repeats inside one token (top-k picks K
distinct experts) with popularity weights: uniform, Zipf-skewed (weight of the i-th most
popular expert ~ 1 / i**s), or a trace-like mix (a global Zipf popularity plus a per-rank
locality term, as real traces show both hot experts and rank-dependent topics).
`routing_from_indices` turns measured indices into the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Routing:
    """Counts of one batch.

    expert_counts: `[R, E]` int64: (token, slot) pairs of source rank r routed to expert e.
    rank_tokens: `[R, R]` int64: distinct tokens of source r that need destination rank d.
    slot_rows: `[R, R]` int64: (token, slot) pairs of source r whose expert lives on rank d.
    num_tokens: T, tokens per rank.
    num_experts_per_token: K.
    node_tokens: `[R, N]` int64: distinct tokens of source r that need node n, for
        `ranks_per_node` ranks per node (None when not computed).
    ranks_per_node: the node size node_tokens was computed for (0 when None).
    """

    expert_counts: np.ndarray
    rank_tokens: np.ndarray
    slot_rows: np.ndarray
    num_tokens: int
    num_experts_per_token: int
    node_tokens: np.ndarray | None = None
    ranks_per_node: int = 0

    @property
    def num_ranks(self) -> int:
        return int(self.rank_tokens.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.expert_counts.shape[1])

    def rows(self, dedup: str) -> np.ndarray:
        """`[R, R]` rows source r sends to rank d: "rank" = distinct tokens, "none" = slots."""
        if dedup == "rank":
            return self.rank_tokens
        if dedup == "none":
            return self.slot_rows
        raise ValueError(f"Routing.rows: dedup expected 'rank' or 'none', got {dedup!r}")


def popularity(num_experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """`[E]` float64 expert weights summing to 1: Zipf with exponent `skew` (0 = uniform),
    the hot experts placed at random positions (so hot experts land on random ranks)."""
    if skew < 0:
        raise ValueError(f"popularity: skew expected >= 0, got {skew}")
    w = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** skew
    w = w[rng.permutation(num_experts)]
    return w / w.sum()


def sample_indices(
    num_ranks: int,
    num_tokens: int,
    num_experts: int,
    num_experts_per_token: int,
    skew: float = 0.0,
    locality: float = 0.0,
    seed: int = 0,
) -> list[np.ndarray]:
    """Per rank `[T, K]` int64 expert indices, K distinct experts per token.

    skew: Zipf exponent of the global expert popularity (0 = uniform).
    locality: weight in [0, 1) of a per-rank Zipf(1.2) popularity mixed into the global one
        (0 = every rank routes alike; the "trace-like" preset uses 0.5).
    Sampling without replacement with weights p: top-K of log p + Gumbel noise.
    """
    if not 0 <= locality < 1:
        raise ValueError(f"sample_indices: locality expected in [0, 1), got {locality}")
    if not 1 <= num_experts_per_token <= num_experts:
        raise ValueError(
            f"sample_indices: num_experts_per_token expected in [1, {num_experts}], "
            f"got {num_experts_per_token}"
        )
    rng = np.random.default_rng(seed)
    glob = popularity(num_experts, skew, rng)
    out = []
    for _ in range(num_ranks):
        p = glob
        if locality > 0:
            p = (1 - locality) * glob + locality * popularity(num_experts, 1.2, rng)
        logp = np.log(p).astype(np.float32)
        g = rng.gumbel(size=(num_tokens, num_experts)).astype(np.float32) + logp
        k = num_experts_per_token
        idx = np.argpartition(-g, k - 1, axis=1)[:, :k] if k < num_experts else np.argsort(-g)
        out.append(idx.astype(np.int64))
    return out


def routing_from_indices(
    indices: Sequence[np.ndarray], num_experts: int, ranks_per_node: int = 8
) -> Routing:
    """Counts from per-rank `[T_r, K]` integer expert indices (numpy or torch CPU tensors).

    Ranks must divide experts: rank of expert e is e // (E / R). Node-level counts are
    filled for `ranks_per_node` when it divides the number of ranks (else left None).
    """
    num_ranks = len(indices)
    if num_ranks == 0 or num_experts % num_ranks:
        raise ValueError(
            f"routing_from_indices: num_experts ({num_experts}) must be a multiple of the "
            f"number of ranks ({num_ranks})"
        )
    e_local = num_experts // num_ranks
    expert_counts = np.zeros((num_ranks, num_experts), np.int64)
    rank_tokens = np.zeros((num_ranks, num_ranks), np.int64)
    num_tokens, k = 0, 0
    for r, idx in enumerate(indices):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 2:
            raise ValueError(f"routing_from_indices: indices[{r}] expected [T, K], got {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= num_experts):
            raise ValueError(f"routing_from_indices: indices[{r}] outside [0, {num_experts})")
        num_tokens, k = max(num_tokens, idx.shape[0]), idx.shape[1]
        expert_counts[r] = np.bincount(idx.ravel(), minlength=num_experts)
        hit = np.zeros((idx.shape[0], num_ranks), bool)  # [T, R]: token needs rank d
        np.put_along_axis(hit, idx // e_local, True, axis=1)
        rank_tokens[r] = hit.sum(axis=0)
    slot_rows = expert_counts.reshape(num_ranks, num_ranks, e_local).sum(axis=2)
    nodes, g = None, 0
    if ranks_per_node >= 1 and num_ranks % ranks_per_node == 0:
        nodes, g = node_tokens(indices, num_experts, ranks_per_node), ranks_per_node
    return Routing(expert_counts, rank_tokens, slot_rows, num_tokens, k, nodes, g)


def node_tokens(indices: Sequence[np.ndarray], num_experts: int, ranks_per_node: int) -> np.ndarray:
    """`[R, N]` int64: distinct tokens of source r that need node n (node-level dedup)."""
    num_ranks = len(indices)
    if num_ranks % ranks_per_node:
        raise ValueError(
            f"node_tokens: ranks ({num_ranks}) must be a multiple of ranks_per_node "
            f"({ranks_per_node})"
        )
    e_node = num_experts // num_ranks * ranks_per_node
    n = num_ranks // ranks_per_node
    out = np.zeros((num_ranks, n), np.int64)
    for r, idx in enumerate(indices):
        idx = np.asarray(idx, dtype=np.int64)
        hit = np.zeros((idx.shape[0], n), bool)
        np.put_along_axis(hit, idx // e_node, True, axis=1)
        out[r] = hit.sum(axis=0)
    return out


@dataclass(frozen=True)
class OverflowStats:
    """Private-region overflow of one routing (remote pairs only: other nodes).

    pairs: remote (source, destination) pairs with at least one row; pairs_overflowing:
    those with more rows than the private region; rows / rows_overflowing: rows sent to
    remote ranks and those beyond the private region; the two fractions."""

    pairs: int
    pairs_overflowing: int
    rows: int
    rows_overflowing: int

    @property
    def pair_fraction(self) -> float:
        return self.pairs_overflowing / self.pairs if self.pairs else 0.0

    @property
    def row_fraction(self) -> float:
        return self.rows_overflowing / self.rows if self.rows else 0.0


def private_overflow(
    routing: Routing, ranks_per_node: int, max_private_tokens: int, dedup: str = "rank"
) -> OverflowStats:
    """How many rows of a dispatch would not fit the private region and wait for counts."""
    rows = routing.rows(dedup)
    node = np.arange(routing.num_ranks) // ranks_per_node
    remote = node[:, None] != node[None, :]
    r = np.where(remote, rows, 0)
    over = np.maximum(r - max_private_tokens, 0)
    return OverflowStats(
        pairs=int((r > 0).sum()),
        pairs_overflowing=int((over > 0).sum()),
        rows=int(r.sum()),
        rows_overflowing=int(over.sum()),
    )


def make_routing(
    kind: str,
    num_ranks: int,
    num_tokens: int,
    num_experts: int,
    num_experts_per_token: int,
    seed: int = 0,
    skew: float = 1.0,
    ranks_per_node: int = 8,
) -> Routing:
    """Routing of a named kind: "uniform", "zipf" (exponent `skew`) or "trace" (Zipf(skew)
    global popularity mixed half and half with per-rank locality)."""
    args = (num_ranks, num_tokens, num_experts, num_experts_per_token)
    if kind == "uniform":
        idx = sample_indices(*args, skew=0.0, seed=seed)
    elif kind == "zipf":
        idx = sample_indices(*args, skew=skew, seed=seed)
    elif kind == "trace":
        idx = sample_indices(*args, skew=skew, locality=0.5, seed=seed)
    else:
        raise ValueError(f"make_routing: kind expected uniform|zipf|trace, got {kind!r}")
    return routing_from_indices(idx, num_experts, ranks_per_node)
