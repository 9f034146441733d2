// rlhf_engine._C: the data path's hot loops in C++ (pybind11, no torch headers, no CUDA).
//
//   pack_ffd(lengths, budget)                 -> bins (lists of sequence indices), first-fit decreasing
//   balance(loads, n_ranks)                   -> per-rank lists of bin indices, equal counts, balanced loads
//   sample_index(doc_lengths, seq_len, epochs, seed) -> (doc_order, sample_starts, shuffle)
//
// The Python twins in rlhf_engine/data/packer.py implement the same algorithms step for step; the tests
// check both give identical output.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <queue>
#include <random>
#include <stdexcept>
#include <vector>

namespace py = pybind11;
using i64 = int64_t;

// First-fit decreasing: sequences sorted by length (longest first, ties by index) go into the first bin
// with room. A max segment tree over the bins' free space finds that bin in O(log n), so n = 1e6 packs
// in well under a second. Unopened bins have the whole budget free, so "the first bin with room" opens a
// new bin exactly when no open one fits, as in the textbook algorithm.
std::vector<std::vector<i64>> pack_ffd(const std::vector<i64>& lengths, i64 budget) {
    const i64 n = static_cast<i64>(lengths.size());
    for (i64 i = 0; i < n; ++i) {
        if (lengths[i] < 1 || lengths[i] > budget)
            throw std::invalid_argument("sequence " + std::to_string(i) + " has length " + std::to_string(lengths[i]) +
                                        ", outside [1, budget=" + std::to_string(budget) + "]");
    }
    std::vector<i64> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](i64 a, i64 b) { return lengths[a] > lengths[b]; });
    i64 size = 1;
    while (size < std::max<i64>(n, 1)) size <<= 1;
    std::vector<i64> tree(2 * size, budget);  // leaves: free space of bin j; inner nodes: max of children
    std::vector<std::vector<i64>> bins;
    for (i64 idx : order) {
        const i64 len = lengths[idx];
        i64 node = 1;
        while (node < size) node = (tree[2 * node] >= len) ? 2 * node : 2 * node + 1;  // leftmost leaf with room
        const i64 bin = node - size;
        if (bin >= static_cast<i64>(bins.size())) bins.emplace_back();
        bins[bin].push_back(idx);
        tree[node] -= len;
        for (node >>= 1; node >= 1; node >>= 1) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
    }
    return bins;
}

// Balanced largest differencing (Karmarkar-Karp for k ranks with equal counts; Michiels et al. 2007):
// loads sorted descending are cut into chunks of k, each chunk a partial partition with one item per
// rank; the two partitions with the largest spread (max - min) are merged repeatedly, the heaviest
// subset of one with the lightest of the other. Every rank ends with the same number of items (the
// input is padded with zero loads, i.e. empty micro-batches, to a multiple of k).
struct Partition {
    std::vector<i64> sums;   // k subset loads, kept sorted descending
    std::vector<i64> head;   // per subset: first item of its linked list (-1: empty), same order as sums
    std::vector<i64> tail;   // per subset: last item
    i64 id = 0;              // creation order: ties in spread pop the oldest first
    i64 spread() const { return sums.front() - sums.back(); }
};

std::vector<std::vector<i64>> balance(const std::vector<i64>& loads, i64 k) {
    if (k < 1) throw std::invalid_argument("n_ranks must be >= 1");
    const i64 n = static_cast<i64>(loads.size());
    std::vector<i64> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](i64 a, i64 b) { return loads[a] > loads[b]; });
    const i64 padded = (n + k - 1) / k * k;
    auto cmp = [](const Partition& a, const Partition& b) {
        return a.spread() != b.spread() ? a.spread() < b.spread() : a.id > b.id;
    };
    std::priority_queue<Partition, std::vector<Partition>, decltype(cmp)> heap(cmp);
    std::vector<i64> next(n, -1);  // subsets are linked lists over items: a merge is O(k), not O(items)
    i64 next_id = 0;
    for (i64 c = 0; c < padded / k; ++c) {
        Partition p;
        for (i64 r = 0; r < k; ++r) {
            const i64 pos = c * k + r;
            const i64 item = pos < n ? order[pos] : -1;  // -1: padding, no micro-batch
            p.sums.push_back(item >= 0 ? loads[item] : 0);
            p.head.push_back(item);
            p.tail.push_back(item);
        }
        p.id = next_id++;
        heap.push(std::move(p));
    }
    std::vector<std::vector<i64>> out(k);
    if (heap.empty()) return out;
    while (heap.size() > 1) {
        Partition a = heap.top(); heap.pop();
        Partition b = heap.top(); heap.pop();
        std::vector<i64> sums(k), head(k), tail(k);
        for (i64 r = 0; r < k; ++r) {  // heaviest of a with lightest of b: a's list, then b's
            const i64 q = k - 1 - r;
            sums[r] = a.sums[r] + b.sums[q];
            if (a.head[r] < 0) { head[r] = b.head[q]; tail[r] = b.tail[q]; }
            else if (b.head[q] < 0) { head[r] = a.head[r]; tail[r] = a.tail[r]; }
            else { next[a.tail[r]] = b.head[q]; head[r] = a.head[r]; tail[r] = b.tail[q]; }
        }
        std::vector<i64> idx(k);
        std::iota(idx.begin(), idx.end(), 0);
        std::stable_sort(idx.begin(), idx.end(), [&](i64 x, i64 y) { return sums[x] > sums[y]; });
        Partition m;
        for (i64 r : idx) { m.sums.push_back(sums[r]); m.head.push_back(head[r]); m.tail.push_back(tail[r]); }
        m.id = next_id++;
        heap.push(std::move(m));
    }
    const Partition& top = heap.top();
    for (i64 r = 0; r < k; ++r)
        for (i64 item = top.head[r]; item >= 0; item = next[item]) out[r].push_back(item);
    return out;
}

// Packing and balancing in one call on numpy arrays: the sequences of bin b are
// order[offsets[b]:offsets[b+1]], rank r owns bins rank_bins[r]; plus the padding fraction and the
// rank imbalance (max load / mean - 1). Nothing crosses into Python objects per sequence.
py::tuple pack_and_balance(py::array_t<i64, py::array::c_style | py::array::forcecast> lengths_arr, i64 budget, i64 k) {
    auto view = lengths_arr.unchecked<1>();
    std::vector<i64> lengths(view.shape(0));
    for (i64 i = 0; i < static_cast<i64>(lengths.size()); ++i) lengths[i] = view(i);
    const auto bins = pack_ffd(lengths, budget);
    std::vector<i64> loads(bins.size()), order, offsets{0};
    order.reserve(lengths.size());
    i64 total = 0;
    for (size_t b = 0; b < bins.size(); ++b) {
        for (i64 i : bins[b]) { loads[b] += lengths[i]; order.push_back(i); }
        offsets.push_back(static_cast<i64>(order.size()));
        total += loads[b];
    }
    const auto ranks = balance(loads, k);
    py::list rank_bins;
    i64 max_load = 0;
    for (const auto& r : ranks) {
        i64 load = 0;
        for (i64 b : r) load += loads[b];
        max_load = std::max(max_load, load);
        rank_bins.append(py::array_t<i64>(r.size(), r.data()));
    }
    const double padding = bins.empty() ? 0.0 : 1.0 - static_cast<double>(total) / (static_cast<double>(bins.size()) * budget);
    const double mean = static_cast<double>(total) / k;
    return py::make_tuple(py::array_t<i64>(order.size(), order.data()), py::array_t<i64>(offsets.size(), offsets.data()),
                          rank_bins, padding, mean > 0 ? max_load / mean - 1.0 : 0.0);
}

// splitmix64: the per-epoch shuffle's random source, identical in the Python twin.
static inline uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Fisher-Yates with splitmix64 draws (modulo; the bias is < 2^-40 for the sizes here).
static void shuffle(std::vector<i64>& v, uint64_t seed) {
    uint64_t state = seed;
    for (i64 i = static_cast<i64>(v.size()) - 1; i > 0; --i) {
        const i64 j = static_cast<i64>(splitmix64(state) % static_cast<uint64_t>(i + 1));
        std::swap(v[i], v[j]);
    }
}

// A Megatron-style sample index over a tokenized corpus: documents in a shuffled order per epoch are
// concatenated; sample s covers tokens [s * seq_len, s * seq_len + seq_len + 1) of that stream (one extra
// token for the next-token target), crossing document boundaries. Returns the document order
// (epochs * n_docs), the start of every sample as (position in the document order, offset in that
// document) and a shuffled order of the samples. Deterministic for a seed.
py::tuple sample_index(const std::vector<i64>& doc_lengths, i64 seq_len, i64 epochs, uint64_t seed) {
    if (seq_len < 1 || epochs < 1) throw std::invalid_argument("seq_len and epochs must be >= 1");
    const i64 n_docs = static_cast<i64>(doc_lengths.size());
    std::vector<i64> doc_order;
    doc_order.reserve(n_docs * epochs);
    i64 total = 0;
    for (i64 e = 0; e < epochs; ++e) {
        std::vector<i64> perm(n_docs);
        std::iota(perm.begin(), perm.end(), 0);
        shuffle(perm, seed * 1000003ULL + static_cast<uint64_t>(e));
        doc_order.insert(doc_order.end(), perm.begin(), perm.end());
        for (i64 d : perm) total += doc_lengths[d];
    }
    const i64 n_samples = total > 0 ? (total - 1) / seq_len : 0;
    py::array_t<i64> starts({n_samples + 1, static_cast<i64>(2)});
    auto s = starts.mutable_unchecked<2>();
    i64 pos = 0, offset = 0;  // current document (in doc_order) and offset inside it
    for (i64 i = 0; i <= n_samples; ++i) {
        s(i, 0) = pos;
        s(i, 1) = offset;
        i64 need = seq_len;  // advance by seq_len tokens for the next sample's start
        while (need > 0 && pos < static_cast<i64>(doc_order.size())) {
            const i64 left = doc_lengths[doc_order[pos]] - offset;
            if (left > need) { offset += need; need = 0; }
            else { need -= left; ++pos; offset = 0; }
        }
    }
    std::vector<i64> order(n_samples);
    std::iota(order.begin(), order.end(), 0);
    shuffle(order, seed * 1000003ULL + 999983ULL);
    return py::make_tuple(py::array_t<i64>(doc_order.size(), doc_order.data()), starts,
                          py::array_t<i64>(order.size(), order.data()));
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "rlhf_engine's C++ data path: sequence packing, rank balancing, corpus sample index";
    m.def("pack_ffd", &pack_ffd, py::arg("lengths"), py::arg("budget"),
          "First-fit decreasing: lists of sequence indices whose lengths fit the token budget.");
    m.def("balance", &balance, py::arg("loads"), py::arg("n_ranks"),
          "Balanced largest differencing: per-rank lists of item indices, equal counts.");
    m.def("pack_and_balance", &pack_and_balance, py::arg("lengths"), py::arg("budget"), py::arg("n_ranks"),
          "(order, bin offsets, per-rank bin indices, padding fraction, rank imbalance) on numpy arrays.");
    m.def("sample_index", &sample_index, py::arg("doc_lengths"), py::arg("seq_len"), py::arg("epochs"),
          py::arg("seed"), "(doc_order, sample_starts (n+1, 2), shuffle) for fixed-length samples.");
}
