"""Token-budget packing, balancing across data-parallel ranks, and the corpus sample index.

    plan = pack_and_balance(lengths, budget=4096, n_ranks=8)   # C++ (rlhf_engine._C)
    plan.ranks[r]               # rank r's micro-batches, each a list of sequence indices
    plan.padding_fraction       # 1 - tokens / (micro-batches * budget)
    plan.rank_imbalance         # max rank load / mean rank load - 1

- ``pack_ffd``: first-fit decreasing into bins of ``budget`` tokens (one bin = one micro-batch, packed
  into a single row);
- ``balance``: balanced largest differencing (Karmarkar-Karp for k ranks, equal micro-batch counts per
  rank, so FSDP's collectives stay in lockstep; Michiels et al. 2007);
- ``sample_index``: Megatron-style fixed-length samples over a tokenized corpus, documents shuffled per
  epoch, deterministic for a seed.

Each has a plain-Python twin (``impl="python"``) running the same algorithm step for step: the tests'
oracle and the benchmark's baseline. The C++ versions are compiled by ``setup.py`` from ``csrc/``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_MASK = (1 << 64) - 1


def _native():
    try:
        from .. import _C  # optional: the C++ extension may be unbuilt; the error says how to build it
    except ImportError as err:
        raise ImportError("rlhf_engine._C is not built: reinstall with `pip install -e .` on a machine with a "
                          "C++17 compiler (g++ or clang++); the error was: " + str(err)) from err
    return _C


# ---------------------------------------------------------------------------------------------- Python twins


def pack_ffd_python(lengths: Sequence[int], budget: int) -> list[list[int]]:
    n = len(lengths)
    for i, length in enumerate(lengths):
        if not 1 <= length <= budget:
            raise ValueError(f"sequence {i} has length {length}, outside [1, budget={budget}]")
    order = sorted(range(n), key=lambda i: -lengths[i])  # stable: ties keep index order
    size = 1
    while size < max(n, 1):
        size <<= 1
    tree = [budget] * (2 * size)
    bins: list[list[int]] = []
    for idx in order:
        length = lengths[idx]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        b = node - size
        if b >= len(bins):
            bins.append([])
        bins[b].append(idx)
        tree[node] -= length
        node >>= 1
        while node >= 1:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node >>= 1
    return bins


def balance_python(loads: Sequence[int], k: int) -> list[list[int]]:
    if k < 1:
        raise ValueError("n_ranks must be >= 1")
    n = len(loads)
    order = sorted(range(n), key=lambda i: -loads[i])
    padded = (n + k - 1) // k * k
    heap: list = []  # (-spread, id, sums, heads, tails): the largest spread first, the oldest among ties
    nxt = [-1] * n  # subsets are linked lists over items, as in the C++ version
    next_id = 0
    for c in range(padded // k):
        items = [order[c * k + r] if c * k + r < n else -1 for r in range(k)]
        sums = [loads[i] if i >= 0 else 0 for i in items]
        heapq.heappush(heap, (-(sums[0] - sums[-1]), next_id, sums, items, list(items)))
        next_id += 1
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, _, a_s, a_h, a_t = heapq.heappop(heap)
        _, _, b_s, b_h, b_t = heapq.heappop(heap)
        sums, heads, tails = [0] * k, [0] * k, [0] * k
        for r in range(k):
            q = k - 1 - r
            sums[r] = a_s[r] + b_s[q]
            if a_h[r] < 0:
                heads[r], tails[r] = b_h[q], b_t[q]
            elif b_h[q] < 0:
                heads[r], tails[r] = a_h[r], a_t[r]
            else:
                nxt[a_t[r]] = b_h[q]
                heads[r], tails[r] = a_h[r], b_t[q]
        idx = sorted(range(k), key=lambda r: -sums[r])
        s = [sums[r] for r in idx]
        heapq.heappush(heap, (-(s[0] - s[-1]), next_id, s, [heads[r] for r in idx], [tails[r] for r in idx]))
        next_id += 1
    out = []
    for head in heap[0][3]:
        items, item = [], head
        while item >= 0:
            items.append(item)
            item = nxt[item]
        out.append(items)
    return out


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return state, z ^ (z >> 31)


def _shuffle(v: list[int], seed: int) -> None:
    state = seed & _MASK
    for i in range(len(v) - 1, 0, -1):
        state, r = _splitmix64(state)
        j = r % (i + 1)
        v[i], v[j] = v[j], v[i]


def sample_index_python(doc_lengths: Sequence[int], seq_len: int, epochs: int, seed: int):
    if seq_len < 1 or epochs < 1:
        raise ValueError("seq_len and epochs must be >= 1")
    n_docs = len(doc_lengths)
    doc_order: list[int] = []
    total = 0
    for e in range(epochs):
        perm = list(range(n_docs))
        _shuffle(perm, (seed * 1000003 + e) & _MASK)
        doc_order += perm
        total += sum(doc_lengths[d] for d in perm)
    n_samples = (total - 1) // seq_len if total > 0 else 0
    starts = np.zeros((n_samples + 1, 2), dtype=np.int64)
    pos = offset = 0
    for i in range(n_samples + 1):
        starts[i] = (pos, offset)
        need = seq_len
        while need > 0 and pos < len(doc_order):
            left = doc_lengths[doc_order[pos]] - offset
            if left > need:
                offset += need
                need = 0
            else:
                need -= left
                pos += 1
                offset = 0
    order = list(range(n_samples))
    _shuffle(order, (seed * 1000003 + 999983) & _MASK)
    return np.array(doc_order, dtype=np.int64), starts, np.array(order, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- the API


def pack_ffd(lengths: Sequence[int], budget: int, impl: str = "cpp") -> list[list[int]]:
    if impl == "python":
        return pack_ffd_python(lengths, budget)
    return _native().pack_ffd(list(map(int, lengths)), int(budget))  # std::invalid_argument -> ValueError


def balance(loads: Sequence[int], n_ranks: int, impl: str = "cpp") -> list[list[int]]:
    if impl == "python":
        return balance_python(loads, n_ranks)
    return _native().balance(list(map(int, loads)), int(n_ranks))


def sample_index(doc_lengths: Sequence[int], seq_len: int, epochs: int, seed: int, impl: str = "cpp"):
    """(doc_order (epochs * n_docs,), sample starts (n + 1, 2) as (position in doc_order, offset),
    shuffled sample order (n,)), as numpy int64 arrays."""
    if impl == "python":
        return sample_index_python(doc_lengths, seq_len, epochs, seed)
    return _native().sample_index(list(map(int, doc_lengths)), int(seq_len), int(epochs), int(seed) & _MASK)


@dataclass(frozen=True)
class PackPlan:
    """Bin b holds sequences ``order[offsets[b]:offsets[b + 1]]``; rank r owns bins ``rank_bins[r]``."""

    order: np.ndarray  # (n,) sequence indices, bin after bin
    offsets: np.ndarray  # (bins + 1,)
    rank_bins: list[np.ndarray]  # per rank: bin indices (equal counts, up to one)
    padding_fraction: float  # 1 - tokens / (bins * budget)
    rank_imbalance: float  # max rank load / mean - 1

    def bin(self, b: int) -> list[int]:
        return self.order[self.offsets[b] : self.offsets[b + 1]].tolist()

    @property
    def ranks(self) -> list[list[list[int]]]:
        """rank -> micro-batches -> sequence indices."""
        return [[self.bin(int(b)) for b in bins] for bins in self.rank_bins]


def pack_and_balance(lengths: Sequence[int], budget: int, n_ranks: int, impl: str = "cpp") -> PackPlan:
    """Pack into micro-batches of at most ``budget`` tokens, then deal them to ranks with balanced token
    loads and equal counts (a rank may get one micro-batch fewer when the count is not a multiple)."""
    if impl != "python":
        order, offsets, rank_bins, pad, imb = _native().pack_and_balance(np.asarray(lengths, dtype=np.int64),
                                                                         int(budget), int(n_ranks))
        return PackPlan(order, offsets, list(rank_bins), pad, imb)
    lengths = list(lengths)
    bins = pack_ffd_python(lengths, budget)
    loads = [sum(lengths[i] for i in b) for b in bins]
    per_rank = balance_python(loads, n_ranks)
    order = np.array([i for b in bins for i in b], dtype=np.int64)
    offsets = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
    total = sum(loads)
    rank_loads = [sum(loads[j] for j in items) for items in per_rank]
    mean = total / n_ranks
    return PackPlan(order, offsets, [np.array(r, dtype=np.int64) for r in per_rank],
                    1.0 - total / (len(bins) * budget) if bins else 0.0, max(rank_loads) / mean - 1.0 if mean > 0 else 0.0)
