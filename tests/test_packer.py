"""The C++ data path (rlhf_engine._C) against its plain-Python twins: token-budget packing, rank
balancing and the corpus sample index; invariants, determinism, identical outputs."""

import random

import numpy as np
import pytest

from rlhf_engine.data import packer


def _lengths(n, seed, hi=512):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(1, 32), rng.randint(1, hi)]) for _ in range(n)]


@pytest.mark.parametrize("n,budget", [(0, 64), (1, 64), (37, 64), (1000, 512), (5000, 2048)])
def test_pack_ffd_invariants_and_identical_to_python(n, budget):
    lengths = _lengths(n, n, hi=budget)
    bins = packer.pack_ffd(lengths, budget)
    assert bins == packer.pack_ffd_python(lengths, budget)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(n))  # every sequence exactly once
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)  # budgets respected
    # first fit: no sequence of a later bin would have fitted the free space of an earlier one at the end
    free = [budget - sum(lengths[i] for i in b) for b in bins]
    smallest_later = [min((lengths[i] for b in bins[j + 1:] for i in b), default=budget + 1) for j in range(len(bins))]
    assert all(f < s for f, s in zip(free, smallest_later))
    # FFD's bound: at most 11/9 OPT + 6/9 bins, OPT >= total / budget
    assert len(bins) <= 11 / 9 * (sum(lengths) / budget + 1) + 1


def test_pack_ffd_by_hand_and_bad_lengths():
    # sorted: 7(3), 5(1), 3(0), 2(2), 1(4); bins of 8: [7, 1], [5, 3], [2]
    assert packer.pack_ffd([3, 5, 2, 7, 1], 8) == [[3, 4], [1, 0], [2]]
    for impl in ("cpp", "python"):
        with pytest.raises(ValueError, match="sequence 1 has length 9"):
            packer.pack_ffd([3, 9], 8, impl=impl)


@pytest.mark.parametrize("n,k", [(0, 4), (3, 4), (10, 3), (257, 8), (2000, 16)])
def test_balance_equal_counts_balanced_and_identical_to_python(n, k):
    rng = random.Random(k)
    loads = [rng.randint(1, 4096) for _ in range(n)]
    ranks = packer.balance(loads, k)
    assert ranks == packer.balance_python(loads, k)
    assert sorted(i for r in ranks for i in r) == list(range(n))
    counts = {len(r) for r in ranks}
    assert max(counts) - min(counts) <= 1 if n else counts == {0}
    if n >= 4 * k:  # balanced: within a small fraction of the mean (LPT-style bound would be 4/3)
        totals = [sum(loads[i] for i in r) for r in ranks]
        assert max(totals) / (sum(totals) / k) - 1 < 0.05


def test_balance_by_hand():
    # chunks of 2 (sorted 9, 5 | 4, 3 | 1, 0-pad): KK merges heaviest with lightest -> {9, 3, 0} / {5, 4, 1}
    assert packer.balance([5, 3, 9, 1, 4], 2) == [[2, 1], [0, 4, 3]]


def test_pack_and_balance_reports_padding_and_imbalance():
    lengths = _lengths(3000, 1, hi=1024)
    plan = packer.pack_and_balance(lengths, 2048, 4)
    assert sorted(i for r in plan.ranks for mb in r for i in mb) == list(range(3000))
    n_bins = sum(len(r) for r in plan.ranks)
    assert plan.padding_fraction == pytest.approx(1 - sum(lengths) / (n_bins * 2048))
    assert 0 <= plan.padding_fraction < 0.05 and 0 <= plan.rank_imbalance < 0.02


@pytest.mark.parametrize("seed", [0, 7])
def test_sample_index_identical_to_python_and_covers_the_stream(seed):
    docs = _lengths(300, seed, hi=200)
    got = packer.sample_index(docs, 64, 2, seed)
    want = packer.sample_index_python(docs, 64, 2, seed)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    order, starts, shuffle = got
    assert sorted(order[:300].tolist()) == list(range(300)) and sorted(order[300:].tolist()) == list(range(300))
    assert order[:300].tolist() != order[300:].tolist()  # each epoch reshuffles
    # sample s starts at token s * 64 of the epoch-concatenated stream
    cum = np.concatenate([[0], np.cumsum([docs[d] for d in order])])
    pos = cum[starts[:, 0]] + starts[:, 1]
    np.testing.assert_array_equal(pos, np.arange(len(starts)) * 64)
    assert len(shuffle) == (2 * sum(docs) - 1) // 64 and sorted(shuffle.tolist()) == list(range(len(shuffle)))
    again = packer.sample_index(docs, 64, 2, seed)
    assert all(np.array_equal(a, b) for a, b in zip(got, again))
    other = packer.sample_index(docs, 64, 2, seed + 1)
    assert not np.array_equal(other[2], shuffle)


def test_pack_and_balance_cpp_equals_python():
    lengths = _lengths(4000, 5, hi=1024)
    a, b = packer.pack_and_balance(lengths, 2048, 8), packer.pack_and_balance(lengths, 2048, 8, impl="python")
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert [r.tolist() for r in a.rank_bins] == [r.tolist() for r in b.rank_bins]
    assert a.padding_fraction == pytest.approx(b.padding_fraction) and a.rank_imbalance == pytest.approx(b.rank_imbalance)
    assert a.ranks == b.ranks
