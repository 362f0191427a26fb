// C++ sequence packer for dpo_fast.packing (exposed as dpo_fast._packing_cpp).
//
// The algorithms, tie-breaks and PRNG mirror dpo_fast/packing.py line for line in meaning, so both
// backends return identical bins; tests/test_packing.py checks that on random inputs. Input checks
// on capacity/algorithm/world_size live in the Python wrapper; the per-item checks live here too
// because scanning a million Python ints in Python would cost more than the packing itself.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <utility>
#include <vector>

#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace py = pybind11;

namespace {

using Index = int32_t;  // item and bin ids; the wrapper rejects more than INT32_MAX items

// Above this capacity the dense (per remaining-capacity value) structures would cost more memory
// and set-up time than they save, and the ordered-set paths are used instead.
int64_t dense_capacity_limit(size_t num_items) {
  return std::min<int64_t>(int64_t{1} << 20, 4 * static_cast<int64_t>(num_items) + (int64_t{1} << 16));
}

// Items sorted by (-length, index), with their lengths in that order: the packing loops read the lengths
// sequentially instead of through the permutation (a cache miss per item on a million items).
void sort_decreasing(const std::vector<int64_t>& lengths, int64_t capacity, std::vector<Index>& order,
                     std::vector<int64_t>& sorted_lengths) {
  const size_t n = lengths.size();
  order.resize(n);
  sorted_lengths.resize(n);
  if (capacity <= dense_capacity_limit(n)) {
    // Counting sort on the key capacity - length: O(n + capacity) and stable in the index.
    std::vector<Index> start(static_cast<size_t>(capacity) + 2, 0);
    for (int64_t len : lengths) ++start[static_cast<size_t>(capacity - len) + 1];
    for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
    for (size_t key = 0; key <= static_cast<size_t>(capacity); ++key) {
      std::fill(sorted_lengths.begin() + start[key], sorted_lengths.begin() + start[key + 1],
                capacity - static_cast<int64_t>(key));
    }
    for (size_t i = 0; i < n; ++i) order[start[static_cast<size_t>(capacity - lengths[i])]++] = static_cast<Index>(i);
  } else {
    std::iota(order.begin(), order.end(), Index{0});
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return lengths[a] > lengths[b]; });
    for (size_t k = 0; k < n; ++k) sorted_lengths[k] = lengths[order[k]];
  }
}

// Index of the lowest set bit of a non-zero word.
inline size_t lowest_bit(uint64_t word) {
#if defined(_MSC_VER)
  unsigned long index;
  _BitScanForward64(&index, word);
  return static_cast<size_t>(index);
#else
  return static_cast<size_t>(__builtin_ctzll(word));
#endif
}

// Hierarchical 64-ary bitset: set/clear and "smallest set bit >= i" in O(log_64 size).
class NextSetBit {
 public:
  explicit NextSetBit(size_t size) {
    size_t bits = std::max<size_t>(size, 1);
    do {
      size_t words = (bits + 63) / 64;
      levels_.emplace_back(words, 0);
      bits = words;
    } while (bits > 1);
  }

  void set(size_t i) {
    for (auto& level : levels_) {
      const size_t w = i >> 6;
      const bool was_empty = level[w] == 0;
      level[w] |= uint64_t{1} << (i & 63);
      if (!was_empty) return;
      i = w;
    }
  }

  void clear(size_t i) {
    for (auto& level : levels_) {
      const size_t w = i >> 6;
      level[w] &= ~(uint64_t{1} << (i & 63));
      if (level[w] != 0) return;
      i = w;
    }
  }

  // Smallest set index >= i, or -1.
  int64_t next(size_t i) const {
    size_t depth = 0;
    for (;;) {  // climb until a word holds a set bit at or after i
      if (depth == levels_.size()) return -1;
      const auto& level = levels_[depth];
      const size_t w = i >> 6;
      if (w >= level.size()) return -1;
      const uint64_t bits = level[w] & (~uint64_t{0} << (i & 63));
      if (bits != 0) {
        i = (w << 6) | lowest_bit(bits);
        break;
      }
      i = w + 1;  // the next word at this level is the next bit one level up
      ++depth;
    }
    while (depth > 0) {  // descend along the lowest set bits
      --depth;
      i = (i << 6) | lowest_bit(levels_[depth][i]);
    }
    return static_cast<int64_t>(i);
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

struct Assignment {
  std::vector<Index> order;    // items in the order they were placed
  std::vector<int64_t> sorted_lengths;  // their lengths, in that order
  std::vector<Index> bin_of;   // bin_of[k]: bin of the k-th placed item
  std::vector<int64_t> loads;  // tokens per bin, bins in creation order
};

// Best fit: the bin with the smallest remaining capacity >= length; among equals, the lowest bin id.
// Dense path: one min-heap of bin ids per remaining-capacity value plus a bitset of non-empty values.
void best_fit_dense(int64_t capacity, Assignment& a) {
  const auto& lengths = a.sorted_lengths;
  const int64_t min_length = lengths.empty() ? 0 : lengths.back();
  std::vector<std::vector<Index>> heaps(static_cast<size_t>(capacity) + 1);
  NextSetBit nonempty(static_cast<size_t>(capacity) + 1);
  const auto greater = std::greater<Index>();
  for (size_t k = 0; k < a.order.size(); ++k) {
    const int64_t len = lengths[k];
    const int64_t r = nonempty.next(static_cast<size_t>(len));
    Index bin;
    int64_t left;
    if (r < 0) {
      bin = static_cast<Index>(a.loads.size());
      a.loads.push_back(0);
      left = capacity - len;
    } else {
      auto& heap = heaps[static_cast<size_t>(r)];
      std::pop_heap(heap.begin(), heap.end(), greater);
      bin = heap.back();
      heap.pop_back();
      if (heap.empty()) nonempty.clear(static_cast<size_t>(r));
      left = r - len;
    }
    a.loads[bin] += len;
    a.bin_of[k] = bin;
    // Items come in decreasing length, so a bin with less room than the shortest item is closed for good;
    // leaving it out changes no choice and keeps the structures small.
    if (left >= min_length) {
      auto& heap = heaps[static_cast<size_t>(left)];
      heap.push_back(bin);
      std::push_heap(heap.begin(), heap.end(), greater);
      if (heap.size() == 1) nonempty.set(static_cast<size_t>(left));
    }
  }
}

// Same choice as best_fit_dense, with an ordered set of (remaining, bin id) for large capacities.
void best_fit_sparse(int64_t capacity, Assignment& a) {
  const auto& lengths = a.sorted_lengths;
  const int64_t min_length = lengths.empty() ? 0 : lengths.back();
  std::set<std::pair<int64_t, Index>> open;
  for (size_t k = 0; k < a.order.size(); ++k) {
    const int64_t len = lengths[k];
    auto it = open.lower_bound({len, std::numeric_limits<Index>::min()});
    Index bin;
    int64_t left;
    if (it == open.end()) {
      bin = static_cast<Index>(a.loads.size());
      a.loads.push_back(0);
      left = capacity - len;
    } else {
      bin = it->second;
      left = it->first - len;
      open.erase(it);
    }
    a.loads[bin] += len;
    a.bin_of[k] = bin;
    if (left >= min_length) open.emplace(left, bin);
  }
}

// First fit: the lowest bin id with remaining capacity >= length, via a max segment tree over bins.
// The tree doubles when the bins outgrow it, so its depth follows the number of bins, not of items, and
// Room is int32 when the capacity allows: both keep the tree in cache.
template <typename Room>
void first_fit(int64_t capacity, Assignment& a) {
  const auto& lengths = a.sorted_lengths;
  size_t size = 1024;
  std::vector<Room> tree(2 * size, Room{-1});  // -1: no bin there yet (a zero-length item fits any real bin)
  for (size_t k = 0; k < lengths.size(); ++k) {
    const Room len = static_cast<Room>(lengths[k]);
    size_t node;
    Index bin;
    if (tree[1] < len) {
      bin = static_cast<Index>(a.loads.size());
      a.loads.push_back(0);
      if (static_cast<size_t>(bin) == size) {
        std::vector<Room> grown(4 * size, Room{-1});
        std::copy(tree.begin() + size, tree.end(), grown.begin() + 2 * size);
        size *= 2;
        for (size_t i = size - 1; i >= 1; --i) grown[i] = std::max(grown[2 * i], grown[2 * i + 1]);
        tree.swap(grown);
      }
      node = size + static_cast<size_t>(bin);
      tree[node] = static_cast<Room>(capacity) - len;
    } else {
      node = 1;
      while (node < size) {
        node <<= 1;
        if (tree[node] < len) ++node;
      }
      bin = static_cast<Index>(node - size);
      tree[node] -= len;
    }
    a.loads[bin] += len;
    a.bin_of[k] = bin;
    for (node >>= 1; node >= 1; node >>= 1) {
      const Room best = std::max(tree[2 * node], tree[2 * node + 1]);
      if (tree[node] == best) break;
      tree[node] = best;
    }
  }
}

// splitmix64 (Steele, Lea, Flood 2014); the Python fallback implements the same recurrence.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
};

// Bin ids in output order. world_size > 1: bins sorted by load (ties: creation order) and cut into groups
// of world_size consecutive bins, so the ranks of one step get near-equal tokens; odd groups are reversed
// so that no rank always gets the heaviest bin. The len % world_size lightest bins form a short last group.
// shuffle: the full groups are permuted by Fisher-Yates driven by splitmix64(seed).
std::vector<Index> bin_order(const std::vector<int64_t>& loads, int64_t world_size, bool shuffle, uint64_t seed) {
  const size_t num_bins = loads.size();
  const size_t ws = static_cast<size_t>(world_size);
  std::vector<Index> sorted(num_bins);
  std::iota(sorted.begin(), sorted.end(), Index{0});
  if (ws > 1) {
    std::stable_sort(sorted.begin(), sorted.end(), [&](Index x, Index y) { return loads[x] > loads[y]; });
  }
  const size_t num_groups = num_bins / ws;
  for (size_t g = 1; g < num_groups; g += 2) {
    std::reverse(sorted.begin() + g * ws, sorted.begin() + (g + 1) * ws);
  }
  std::vector<size_t> groups(num_groups);
  std::iota(groups.begin(), groups.end(), size_t{0});
  if (shuffle) {
    SplitMix64 rng{seed};
    for (size_t i = num_groups; i-- > 1;) std::swap(groups[i], groups[rng.next() % (i + 1)]);
  }
  std::vector<Index> out;
  out.reserve(num_bins);
  for (size_t g : groups) out.insert(out.end(), sorted.begin() + g * ws, sorted.begin() + (g + 1) * ws);
  out.insert(out.end(), sorted.begin() + num_groups * ws, sorted.end());
  return out;
}

// Pauses Python's cyclic garbage collector for its lifetime, restoring the previous state.
class GcPause {
 public:
  GcPause() : was_enabled_(PyGC_Disable()) {}
  ~GcPause() {
    if (was_enabled_) PyGC_Enable();
  }
  GcPause(const GcPause&) = delete;
  GcPause& operator=(const GcPause&) = delete;

 private:
  int was_enabled_;
};

void check_lengths(const std::vector<int64_t>& lengths, int64_t capacity) {
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t len = lengths[i];
    if (len < 0) {
      throw py::value_error("lengths[" + std::to_string(i) + "] = " + std::to_string(len) +
                            " is negative; every length must be >= 0");
    }
    if (len > capacity) {
      throw py::value_error("item " + std::to_string(i) + " has length " + std::to_string(len) +
                            " > capacity " + std::to_string(capacity) +
                            ": a pair must fit whole in one bin; raise capacity or truncate/drop the pair");
    }
  }
}

py::list pack_lengths(const std::vector<int64_t>& lengths, int64_t capacity, const std::string& algorithm,
                      int64_t world_size, bool shuffle, uint64_t seed) {
  if (capacity <= 0) throw py::value_error("capacity must be a positive int");
  if (world_size <= 0) throw py::value_error("world_size must be a positive int");
  if (algorithm != "bfd" && algorithm != "ffd") throw py::value_error("algorithm must be 'bfd' or 'ffd'");
  if (lengths.size() > static_cast<size_t>(std::numeric_limits<Index>::max())) {
    throw py::value_error("lengths has more than 2**31 - 1 items");
  }
  check_lengths(lengths, capacity);

  Assignment a;
  std::vector<Index> output_bins;
  std::vector<size_t> offsets;  // CSR over bins in creation order
  std::vector<Index> members;
  {
    py::gil_scoped_release release;
    sort_decreasing(lengths, capacity, a.order, a.sorted_lengths);
    a.bin_of.resize(a.order.size());
    if (algorithm == "ffd") {
      if (capacity <= std::numeric_limits<int32_t>::max()) {
        first_fit<int32_t>(capacity, a);
      } else {
        first_fit<int64_t>(capacity, a);
      }
    } else if (capacity <= dense_capacity_limit(lengths.size())) {
      best_fit_dense(capacity, a);
    } else {
      best_fit_sparse(capacity, a);
    }
    const size_t num_bins = a.loads.size();
    offsets.assign(num_bins + 1, 0);
    for (Index bin : a.bin_of) ++offsets[static_cast<size_t>(bin) + 1];
    for (size_t b = 0; b < num_bins; ++b) offsets[b + 1] += offsets[b];
    members.resize(a.order.size());
    std::vector<size_t> cursor(offsets.begin(), offsets.end() - 1);
    for (size_t k = 0; k < a.order.size(); ++k) members[cursor[a.bin_of[k]]++] = a.order[k];  // insertion order
    output_bins = bin_order(a.loads, world_size, shuffle, seed);
  }

  // Raw C API: building ~10^6 Python ints is the largest cost left, and py::list.append would double it.
  // The cyclic GC is paused meanwhile: the new lists hold only ints, so there is no cycle to find, and
  // every 700 new lists would otherwise trigger a collection that walks the whole heap now and then.
  const GcPause no_gc;
  PyObject* result = PyList_New(static_cast<Py_ssize_t>(output_bins.size()));
  if (result == nullptr) throw py::error_already_set();
  py::list out = py::reinterpret_steal<py::list>(result);
  for (size_t slot = 0; slot < output_bins.size(); ++slot) {
    const size_t b = static_cast<size_t>(output_bins[slot]);
    PyObject* bin = PyList_New(static_cast<Py_ssize_t>(offsets[b + 1] - offsets[b]));
    if (bin == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(result, static_cast<Py_ssize_t>(slot), bin);
    for (size_t m = offsets[b]; m < offsets[b + 1]; ++m) {
      PyObject* item = PyLong_FromLong(static_cast<long>(members[m]));
      if (item == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(bin, static_cast<Py_ssize_t>(m - offsets[b]), item);
    }
  }
  return out;
}

// A list or tuple of ints. Anything else (floats, ints beyond int64) raises TypeError, and the Python
// wrapper then re-checks the input itself to raise the same message as the fallback would.
std::vector<int64_t> lengths_from_sequence(const py::handle& seq) {
  PyObject* fast = PySequence_Fast(seq.ptr(), "lengths must be a sequence of ints");
  if (fast == nullptr) throw py::error_already_set();
  py::object keep = py::reinterpret_steal<py::object>(fast);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  std::vector<int64_t> lengths(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!PyLong_Check(item)) throw py::type_error("lengths must hold Python ints");
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0) throw py::type_error("a length does not fit in int64");
    if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
    lengths[static_cast<size_t>(i)] = value;
  }
  return lengths;
}

}  // namespace

PYBIND11_MODULE(_packing_cpp, m) {
  m.doc() = "C++ bin packer behind dpo_fast.packing (use dpo_fast.packing.pack, not this module).";
  m.def(
      "pack",
      [](py::handle lengths, int64_t capacity, const std::string& algorithm, int64_t world_size, bool shuffle,
         uint64_t seed) {
        return pack_lengths(lengths_from_sequence(lengths), capacity, algorithm, world_size, shuffle, seed);
      },
      py::arg("lengths"), py::arg("capacity"), py::arg("algorithm"), py::arg("world_size"), py::arg("shuffle"),
      py::arg("seed"));
  m.def(
      "pack_array",
      [](py::array_t<int64_t, py::array::c_style> lengths, int64_t capacity, const std::string& algorithm,
         int64_t world_size, bool shuffle, uint64_t seed) {
        if (lengths.ndim() != 1) throw py::value_error("lengths must be 1-D");
        const int64_t* data = lengths.data();
        std::vector<int64_t> copy(data, data + lengths.shape(0));
        return pack_lengths(copy, capacity, algorithm, world_size, shuffle, seed);
      },
      py::arg("lengths"), py::arg("capacity"), py::arg("algorithm"), py::arg("world_size"), py::arg("shuffle"),
      py::arg("seed"));
  m.def(
      "splitmix64",
      [](uint64_t seed, size_t count) {
        SplitMix64 rng{seed};
        py::list out;
        for (size_t i = 0; i < count; ++i) out.append(py::int_(rng.next()));
        return out;
      },
      py::arg("seed"), py::arg("count"), "The first `count` outputs of splitmix64 seeded with `seed` (for tests).");
}
