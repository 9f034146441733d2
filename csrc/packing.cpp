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
    std::vector<i64> sums;                 // k subset loads, kept sorted descending
    std::vector<std::vector<i64>> items;   // item indices per subset, in the same order
    i64 id = 0;                            // creation order: ties in spread pop the oldest first
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
    i64 next_id = 0;
    std::priority_queue<Partition, std::vector<Partition>, decltype(cmp)> heap(cmp);
    for (i64 c = 0; c < padded / k; ++c) {
        Partition p;
        for (i64 r = 0; r < k; ++r) {
            const i64 pos = c * k + r;
            const i64 item = pos < n ? order[pos] : -1;  // -1: padding, no micro-batch
            p.sums.push_back(item >= 0 ? loads[item] : 0);
            p.items.push_back(item >= 0 ? std::vector<i64>{item} : std::vector<i64>{});
        }
        p.id = next_id++;
        heap.push(std::move(p));
    }
    if (heap.empty()) return std::vector<std::vector<i64>>(k);
    while (heap.size() > 1) {
        Partition a = heap.top(); heap.pop();
        Partition b = heap.top(); heap.pop();
        Partition m;
        for (i64 r = 0; r < k; ++r) {  // heaviest of a with lightest of b
            m.sums.push_back(a.sums[r] + b.sums[k - 1 - r]);
            std::vector<i64> merged = a.items[r];
            merged.insert(merged.end(), b.items[k - 1 - r].begin(), b.items[k - 1 - r].end());
            m.items.push_back(std::move(merged));
        }
        std::vector<i64> idx(k);
        std::iota(idx.begin(), idx.end(), 0);
        std::stable_sort(idx.begin(), idx.end(), [&](i64 x, i64 y) { return m.sums[x] > m.sums[y]; });
        Partition s;
        for (i64 r : idx) { s.sums.push_back(m.sums[r]); s.items.push_back(std::move(m.items[r])); }
        s.id = next_id++;
        heap.push(std::move(s));
    }
    return heap.top().items;
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
    m.def("sample_index", &sample_index, py::arg("doc_lengths"), py::arg("seq_len"), py::arg("epochs"),
          py::arg("seed"), "(doc_order, sample_starts (n+1, 2), shuffle) for fixed-length samples.");
}
