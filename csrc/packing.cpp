// C++ sequence packer for dpo_fast.packing (exposed as dpo_fast._packing_cpp).
//
// The algorithms, tie-breaks and PRNG mirror dpo_fast/packing.py line for line in meaning, so both
// backends return identical bins; tests/test_packing.py checks that on random inputs. Input checks
// on capacity/algorithm/world_size live in the Python wrapper; the per-item checks live here too
// because scanning a million Python ints in Python would cost more than the packing itself.
//
// One pipeline serves both entry points: read + check + count lengths, counting sort, placement (one bin
// id per placed item), bin output order, then a scatter of the item ids into their bins, bins already in
// output order. `pack_flat` scatters straight into the numpy array it returns; `pack` scatters into a
// scratch buffer and then builds the list of lists from it, sequentially.
//
// Measured inside the module on the benchmark input (10^6 lognormal lengths, capacity 8192, bfd, numpy
// int64 input, 2-core shared VM, medians): check + counting sort 5.4 ms, placement 2.4 ms, bin order 0.9 ms,
// scatter into the output 4.8 ms; 13.6 ms in all. Building the 10^6 Python ints and 10^5 lists of the
// list API takes ~31 ms on its own, which is why the flat API exists.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <new>
#include <numeric>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_MSC_VER)
#include <intrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace py = pybind11;

namespace {

using Index = int32_t;  // item and bin ids; the wrapper rejects more than INT32_MAX items

// An uninitialised array: every buffer below is fully written before it is read, and zero-filling the
// item-sized ones (4 MB each at 10^6 items) would only add a pass over memory. The item-sized ones are
// fresh memory at each call, and on the development VM a first-touch page fault costs ~1.5 us: with
// populate (Linux) they are mapped with MAP_POPULATE, all pages in one system call, which measured 3 ms
// less per call on the benchmark input. Transparent huge pages (madvise) were tried too: faster on average,
// but now and then a call took 2x longer while the kernel compacted memory for them.
template <typename T>
class Buffer {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>);

 public:
  Buffer() = default;
  // populate: the caller writes the whole buffer, so its pages are worth mapping up front.
  explicit Buffer(size_t size, bool populate = false) : size_(size) {
    if (size == 0) return;
#if defined(__linux__) && defined(MAP_POPULATE)
    if (populate && bytes() >= (size_t{1} << 20)) {
      void* memory = mmap(nullptr, bytes(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
      if (memory != MAP_FAILED) {
        data_ = static_cast<T*>(memory);
        mapped_ = true;
        return;
      }
    }
#endif
    data_ = static_cast<T*>(std::malloc(bytes()));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  Buffer(Buffer&& other) noexcept { swap(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    Buffer(std::move(other)).swap(*this);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (data_ == nullptr) return;
#if defined(__linux__) && defined(MAP_POPULATE)
    if (mapped_) {
      munmap(data_, bytes());
      return;
    }
#endif
    std::free(data_);
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }
  size_t size() const { return size_; }

 private:
  size_t bytes() const { return size_ * sizeof(T); }
  void swap(Buffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(mapped_, other.mapped_);
  }

  T* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
};

// Above this capacity the dense (per remaining-capacity value) structures would cost more memory
// and set-up time than they save, and the ordered-set paths are used instead.
int64_t dense_capacity_limit(size_t num_items) {
  return std::min<int64_t>(int64_t{1} << 20, 4 * static_cast<int64_t>(num_items) + (int64_t{1} << 16));
}

[[noreturn]] void throw_negative(size_t i, int64_t len) {
  throw py::value_error("lengths[" + std::to_string(i) + "] = " + std::to_string(len) +
                        " is negative; every length must be >= 0");
}

[[noreturn]] void throw_too_long(size_t i, int64_t len, int64_t capacity) {
  throw py::value_error("item " + std::to_string(i) + " has length " + std::to_string(len) + " > capacity " +
                        std::to_string(capacity) +
                        ": a pair must fit whole in one bin; raise capacity or truncate/drop the pair");
}

// Items sorted by (-length, index). Dense capacities keep the lengths implicit: the items of length
// capacity - key are order[start[key] .. start[key + 1]), so the placement loop walks the runs instead of
// reading a sorted copy of the lengths (one 4-8 MB array less to write and read).
struct SortedItems {
  Buffer<Index> order;
  std::vector<Index> start;        // dense: run boundaries by key = capacity - length, capacity + 2 entries
  std::vector<int64_t> lengths;    // sparse: the lengths in placement order
  int64_t capacity = 0;
  bool dense = false;

  int64_t min_length() const {
    if (order.size() == 0) return 0;
    if (!dense) return lengths.back();
    size_t key = start.size() - 2;
    while (start[key] == start[key + 1]) --key;  // the last non-empty run holds the shortest items
    return capacity - static_cast<int64_t>(key);
  }

  // f(k, length) for the k-th placed item, k = 0, 1, ...
  template <typename F>
  void for_each(F&& f) const {
    for_each_run([&](size_t begin, size_t end, int64_t len) {
      for (size_t k = begin; k < end; ++k) f(k, len);
    });
  }

  // f(begin, end, length) for each maximal run of placed items [begin, end) of equal length, longest first.
  // size_t counters: the extension is built with -fwrapv (Python's flags), under which an int32 counter is
  // re-extended at every step.
  template <typename F>
  void for_each_run(F&& f) const {
    if (dense) {
      for (size_t key = 0; key + 1 < start.size(); ++key) {
        const size_t begin = static_cast<size_t>(start[key]), end = static_cast<size_t>(start[key + 1]);
        if (begin != end) f(begin, end, capacity - static_cast<int64_t>(key));
      }
    } else {
      for (size_t begin = 0, end; begin < lengths.size(); begin = end) {
        for (end = begin + 1; end < lengths.size() && lengths[end] == lengths[begin];) ++end;
        f(begin, end, lengths[begin]);
      }
    }
  }
};

// Sets up `s` for n items: dense or not, and the (zeroed) run counts of the counting sort.
void begin_sort(size_t n, int64_t capacity, SortedItems& s) {
  s.capacity = capacity;
  s.dense = capacity <= dense_capacity_limit(n);
  if (s.dense) s.start.assign(static_cast<size_t>(capacity) + 2, 0);
}

// The check of one length, and its count for the counting sort (key = capacity - length, stored shifted by
// one so that the prefix sum turns the counts into run starts). Done while the lengths are read anyway.
inline void check_and_count(size_t i, int64_t len, SortedItems& s) {
  if (len < 0) throw_negative(i, len);
  if (len > s.capacity) throw_too_long(i, len, s.capacity);
  if (s.dense) ++s.start[static_cast<size_t>(s.capacity - len) + 1];
}

// Sorts checked and counted lengths. T: their storage type.
template <typename T>
void finish_sort(const T* lengths, size_t n, SortedItems& s) {
  s.order = Buffer<Index>(n, true);
  Index* order = s.order.data();
  if (s.dense) {
    // Counting sort: O(n + capacity), stable in the index.
    std::vector<Index>& start = s.start;
    for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
    std::vector<Index> cursor(start.begin(), start.end() - 1);
    const int64_t capacity = s.capacity;
    for (size_t i = 0; i < n; ++i) order[cursor[static_cast<size_t>(capacity - lengths[i])]++] = static_cast<Index>(i);
  } else {
    std::iota(order, order + n, Index{0});
    std::stable_sort(order, order + n, [&](Index x, Index y) { return lengths[x] > lengths[y]; });
    s.lengths.resize(n);
    for (size_t k = 0; k < n; ++k) s.lengths[k] = lengths[order[k]];
  }
}

template <typename T>
void check_and_sort(const T* lengths, size_t n, int64_t capacity, SortedItems& s) {
  begin_sort(n, capacity, s);
  for (size_t i = 0; i < n; ++i) check_and_count(i, lengths[i], s);
  finish_sort(lengths, n, s);
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

// The placement: bin_of[k] for the k-th placed item, and per bin (creation order) its load and item count.
// `link` is the placement's own per-bin field (the stack link of best_fit_dense); the three share a cache
// line because the bin a placement picks is a random one among ~10^5 and all three are touched.
struct BinState {
  int64_t load;
  Index count;
  Index link;
};

struct Assignment {
  Buffer<Index> bin_of;
  Buffer<BinState> bins;  // room for one bin per item, the most there can be; num_bins are in use
  size_t num_bins = 0;

  Index open_bin() {
    bins[num_bins] = BinState{0, 0, -1};
    return static_cast<Index>(num_bins++);
  }
  void put(size_t k, Index bin, int64_t len) { put_run(k, k + 1, bin, len); }
  // Items [begin, end) of length len, all into bin.
  void put_run(size_t begin, size_t end, Index bin, int64_t len) {
    std::fill(bin_of.data() + begin, bin_of.data() + end, bin);
    BinState& state = bins[static_cast<size_t>(bin)];
    state.load += static_cast<int64_t>(end - begin) * len;
    state.count += static_cast<Index>(end - begin);
  }
};

// How many of the `available` items of length len the next bin takes, given its room (>= len): as many
// as fit. Placing items of one length one by one, each goes to the same bin as long as it still fits (for
// best fit the bin's new room is the smallest that fits, for first fit no lower bin fits), so a bin takes
// them all at once and the search structures are updated once per bin and run instead of once per item.
inline size_t items_taken(int64_t room, int64_t len, size_t available) {
  if (len == 0) return available;
  return static_cast<size_t>(std::min<int64_t>(room / len, static_cast<int64_t>(available)));
}

// Best fit: the bin with the smallest remaining capacity >= length; among equals, the one that reached
// that room last (LIFO). Dense path: per room value an intrusive stack of bins (top[room], then each bin's
// link), plus a bitset of the rooms whose stack is non-empty. Nothing is allocated per item. The former
// tie-break, lowest bin id, needed a min-heap per room (a std::vector each); the benchmark placement
// (10^6 items, capacity 8192) took 21 ms with the heaps and 15 ms with the stacks, same loads and fill.
//
// Items come in runs of equal length, and within a run the best room rarely needs a search: with `best`
// the smallest non-empty room >= len, all rooms in [len, best) are empty, and after a bin has taken its
// items_taken the new smallest is `best` again while its stack is non-empty, else the next non-empty room
// above it. Only the first bin of a run and a stack that empties search the bitset. Benchmark placement:
// 15 ms searching per item, 7.3 ms with `best` carried along the run item by item, 2.4 ms a bin at a time.
void best_fit_dense(const SortedItems& s, Assignment& a) {
  const int64_t capacity = s.capacity;
  const int64_t min_length = s.min_length();
  std::vector<Index> top(static_cast<size_t>(capacity) + 1, Index{-1});
  NextSetBit nonempty(static_cast<size_t>(capacity) + 1);
  s.for_each_run([&](size_t begin, size_t end, int64_t len) {
    int64_t best = nonempty.next(static_cast<size_t>(len));  // -1: no open bin fits len
    for (size_t k = begin; k < end;) {
      Index bin;
      int64_t room;
      if (best < 0) {
        bin = a.open_bin();
        room = capacity;
      } else {
        bin = top[static_cast<size_t>(best)];
        const Index rest = a.bins[static_cast<size_t>(bin)].link;
        top[static_cast<size_t>(best)] = rest;
        if (rest < 0) nonempty.clear(static_cast<size_t>(best));
        room = best;
      }
      const size_t taken = items_taken(room, len, end - k);
      a.put_run(k, k + taken, bin, len);
      k += taken;
      const int64_t left = room - static_cast<int64_t>(taken) * len;
      // Items come in decreasing length, so a bin with less room than the shortest item is closed for
      // good; leaving it out changes no choice and keeps the structures small.
      if (left >= min_length) {
        Index& head = top[static_cast<size_t>(left)];
        if (head < 0) nonempty.set(static_cast<size_t>(left));
        a.bins[static_cast<size_t>(bin)].link = head;
        head = bin;
      }
      // left < len unless the run is done. A new bin leaves best at -1: nothing else fits len either.
      if (best >= 0 && top[static_cast<size_t>(best)] < 0) best = nonempty.next(static_cast<size_t>(best) + 1);
    }
  });
}

// Same choice as best_fit_dense, with an ordered set for large capacities: (room, -stamp, bin), where
// stamp is the number of the placement that last changed the bin, so the latest comes first among equals.
void best_fit_sparse(const SortedItems& s, Assignment& a) {
  const int64_t capacity = s.capacity;
  const int64_t min_length = s.min_length();
  struct Open {
    int64_t room;
    int64_t neg_stamp;
    Index bin;
    bool operator<(const Open& o) const { return room != o.room ? room < o.room : neg_stamp < o.neg_stamp; }
  };
  std::set<Open> open;
  s.for_each([&](size_t k, int64_t len) {
    auto it = open.lower_bound(Open{len, std::numeric_limits<int64_t>::min(), 0});
    Index bin;
    int64_t left;
    if (it == open.end()) {
      bin = a.open_bin();
      left = capacity - len;
    } else {
      bin = it->bin;
      left = it->room - len;
      open.erase(it);
    }
    a.put(k, bin, len);
    if (left >= min_length) open.insert(Open{left, -static_cast<int64_t>(k), bin});
  });
}

// First fit: the lowest bin id with remaining capacity >= length, via a max segment tree over bins.
// The tree doubles when the bins outgrow it, so its depth follows the number of bins, not of items, and
// Room is int32 when the capacity allows: both keep the tree in cache. One descent and one update per bin
// and run of equal lengths (items_taken): 54 ms -> 11 ms for the benchmark placement, same bins.
template <typename Room>
void first_fit(const SortedItems& s, Assignment& a) {
  const Room capacity = static_cast<Room>(s.capacity);
  size_t size = 1024;
  std::vector<Room> tree(2 * size, Room{-1});  // -1: no bin there yet (a zero-length item fits any real bin)
  s.for_each_run([&](size_t begin, size_t end, int64_t length) {
    const Room len = static_cast<Room>(length);
    for (size_t k = begin; k < end;) {
      size_t node;
      Index bin;
      if (tree[1] < len) {
        bin = a.open_bin();
        if (static_cast<size_t>(bin) == size) {
          std::vector<Room> grown(4 * size, Room{-1});
          std::copy(tree.begin() + static_cast<std::ptrdiff_t>(size), tree.end(),
                    grown.begin() + static_cast<std::ptrdiff_t>(2 * size));
          size *= 2;
          for (size_t i = size - 1; i >= 1; --i) grown[i] = std::max(grown[2 * i], grown[2 * i + 1]);
          tree.swap(grown);
        }
        node = size + static_cast<size_t>(bin);
        tree[node] = capacity;
      } else {
        node = 1;
        while (node < size) {
          node <<= 1;
          if (tree[node] < len) ++node;
        }
        bin = static_cast<Index>(node - size);
      }
      const size_t taken = items_taken(tree[node], length, end - k);
      a.put_run(k, k + taken, bin, length);
      k += taken;
      tree[node] -= static_cast<Room>(static_cast<int64_t>(taken) * length);
      for (node >>= 1; node >= 1; node >>= 1) {
        const Room best = std::max(tree[2 * node], tree[2 * node + 1]);
        if (tree[node] == best) break;
        tree[node] = best;
      }
    }
  });
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
std::vector<Index> bin_order(const BinState* bins, size_t num_bins, int64_t capacity, int64_t world_size, bool shuffle,
                             uint64_t seed) {
  const size_t ws = static_cast<size_t>(world_size);
  std::vector<Index> sorted(num_bins);
  if (ws == 1) {
    std::iota(sorted.begin(), sorted.end(), Index{0});
  } else if (capacity <= dense_capacity_limit(num_bins)) {
    // Counting sort on capacity - load: stable, so ties stay in creation order like the stable_sort below.
    std::vector<Index> start(static_cast<size_t>(capacity) + 2, 0);
    for (size_t b = 0; b < num_bins; ++b) ++start[static_cast<size_t>(capacity - bins[b].load) + 1];
    for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
    for (size_t b = 0; b < num_bins; ++b) sorted[start[static_cast<size_t>(capacity - bins[b].load)]++] = static_cast<Index>(b);
  } else {
    std::iota(sorted.begin(), sorted.end(), Index{0});
    std::stable_sort(sorted.begin(), sorted.end(), [&](Index x, Index y) { return bins[x].load > bins[y].load; });
  }
  const size_t num_groups = num_bins / ws;
  for (size_t g = 1; g < num_groups; g += 2) {
    std::reverse(sorted.begin() + static_cast<std::ptrdiff_t>(g * ws),
                 sorted.begin() + static_cast<std::ptrdiff_t>((g + 1) * ws));
  }
  if (!shuffle || num_groups < 2) return sorted;
  std::vector<size_t> groups(num_groups);
  std::iota(groups.begin(), groups.end(), size_t{0});
  SplitMix64 rng{seed};
  for (size_t i = num_groups; i-- > 1;) std::swap(groups[i], groups[rng.next() % (i + 1)]);
  std::vector<Index> out;
  out.reserve(num_bins);
  for (size_t g : groups) {
    out.insert(out.end(), sorted.begin() + static_cast<std::ptrdiff_t>(g * ws),
               sorted.begin() + static_cast<std::ptrdiff_t>((g + 1) * ws));
  }
  out.insert(out.end(), sorted.begin() + static_cast<std::ptrdiff_t>(num_groups * ws), sorted.end());
  return out;
}

// Everything after the check: sorted items, their bins, the bins' output order.
struct Packing {
  SortedItems sorted;
  Assignment assignment;
  std::vector<Index> output_bins;
};

void place_and_order(Packing& p, const std::string& algorithm, int64_t world_size, bool shuffle, uint64_t seed) {
  const SortedItems& s = p.sorted;
  Assignment& a = p.assignment;
  if (a.bin_of.size() != s.order.size()) a.bin_of = Buffer<Index>(s.order.size(), true);
  a.bins = Buffer<BinState>(s.order.size());
  if (algorithm == "ffd") {
    if (s.capacity <= std::numeric_limits<int32_t>::max()) {
      first_fit<int32_t>(s, a);
    } else {
      first_fit<int64_t>(s, a);
    }
  } else if (s.dense) {
    best_fit_dense(s, a);
  } else {
    best_fit_sparse(s, a);
  }
  p.output_bins = bin_order(a.bins.data(), a.num_bins, s.capacity, world_size, shuffle, seed);
}

// Writes the item ids bin after bin in output order (insertion order inside a bin) to items, and the bin
// boundaries to offsets (num_bins + 1 entries). Bins are placed by a prefix sum over their counts, then
// one pass over the placed items drops each at its bin's cursor: no per-bin member lists.
template <typename Item>
void scatter(const Packing& p, Item* items, int64_t* offsets) {
  const Assignment& a = p.assignment;
  const size_t num_bins = a.num_bins;
  std::vector<Index> cursor(num_bins);  // Index, not int64: half the cache footprint of this random access
  offsets[0] = 0;
  for (size_t slot = 0; slot < num_bins; ++slot) {
    const size_t b = static_cast<size_t>(p.output_bins[slot]);
    cursor[b] = static_cast<Index>(offsets[slot]);
    offsets[slot + 1] = offsets[slot] + a.bins[b].count;
  }
  const Index* order = p.sorted.order.data();
  const Index* bin_of = a.bin_of.data();
  for (size_t k = 0; k < p.sorted.order.size(); ++k) {
    items[static_cast<size_t>(cursor[static_cast<size_t>(bin_of[k])]++)] = order[k];
  }
}

void check_arguments(size_t n, int64_t capacity, const std::string& algorithm, int64_t world_size) {
  if (capacity <= 0) throw py::value_error("capacity must be a positive int");
  if (world_size <= 0) throw py::value_error("world_size must be a positive int");
  if (algorithm != "bfd" && algorithm != "ffd") throw py::value_error("algorithm must be 'bfd' or 'ffd'");
  if (n > static_cast<size_t>(std::numeric_limits<Index>::max())) {
    throw py::value_error("lengths has more than 2**31 - 1 items");
  }
}

// Reads `lengths` (a list or tuple of Python ints, or a 1-D C-contiguous int32/int64 numpy array, used in
// place), checks it, and packs it. Anything else (floats, numpy scalars, ints beyond int64) raises
// TypeError, and the Python wrapper then re-checks the input itself to raise the fallback's message.
Packing pack_input(py::handle lengths, int64_t capacity, const std::string& algorithm, int64_t world_size,
                   bool shuffle, uint64_t seed) {
  Packing p;
  if (py::isinstance<py::array>(lengths)) {
    auto array = py::reinterpret_borrow<py::array>(lengths);
    if (array.ndim() != 1 || !(array.flags() & py::array::c_style)) {
      throw py::type_error("lengths must be a 1-D C-contiguous array");
    }
    const size_t n = static_cast<size_t>(array.shape(0));
    check_arguments(n, capacity, algorithm, world_size);
    if (py::isinstance<py::array_t<int64_t>>(array)) {
      check_and_sort(static_cast<const int64_t*>(array.data()), n, capacity, p.sorted);
    } else if (py::isinstance<py::array_t<int32_t>>(array)) {
      check_and_sort(static_cast<const int32_t*>(array.data()), n, capacity, p.sorted);
    } else {
      throw py::type_error("lengths must be an int32 or int64 array");
    }
    py::gil_scoped_release release;  // `array` is borrowed from the caller, who keeps it alive
    place_and_order(p, algorithm, world_size, shuffle, seed);
    return p;
  }
  PyObject* fast = PySequence_Fast(lengths.ptr(), "lengths must be a sequence of ints");
  if (fast == nullptr) throw py::error_already_set();
  py::object keep = py::reinterpret_steal<py::object>(fast);
  const size_t n = static_cast<size_t>(PySequence_Fast_GET_SIZE(fast));
  check_arguments(n, capacity, algorithm, world_size);
  PyObject** objects = PySequence_Fast_ITEMS(fast);
  // Checked while read, so every stored value is in [0, capacity]: int32 storage when the capacity allows
  // halves the memory traffic of the sort.
  begin_sort(n, capacity, p.sorted);
  auto read = [&](auto* out) {
    using T = std::remove_pointer_t<decltype(out)>;
    for (size_t i = 0; i < n; ++i) {
      PyObject* item = objects[i];
      if (!PyLong_Check(item)) throw py::type_error("lengths must hold Python ints");
      int overflow = 0;
      const long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
      if (overflow != 0) throw py::type_error("a length does not fit in int64");
      if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
      check_and_count(i, value, p.sorted);
      out[i] = static_cast<T>(value);
    }
    finish_sort(out, n, p.sorted);
  };
  if (capacity <= std::numeric_limits<int32_t>::max()) {
    Buffer<int32_t> values(n, true);
    read(values.data());
    p.assignment.bin_of = std::move(values);  // the lengths are dead once sorted: one 4 MB buffer less
  } else {
    Buffer<int64_t> values(n);
    read(values.data());
  }
  py::gil_scoped_release release;
  place_and_order(p, algorithm, world_size, shuffle, seed);
  return p;
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

py::list pack_lists(py::handle lengths, int64_t capacity, const std::string& algorithm, int64_t world_size,
                    bool shuffle, uint64_t seed) {
  const Packing p = pack_input(lengths, capacity, algorithm, world_size, shuffle, seed);
  const size_t num_bins = p.output_bins.size();
  Buffer<Index> items(p.sorted.order.size());
  std::vector<int64_t> offsets(num_bins + 1);
  scatter(p, items.data(), offsets.data());

  // Raw C API: building ~10^6 Python ints is the largest cost left (~30 ms, more than the whole packing),
  // and py::list.append would double it. The cyclic GC is paused meanwhile: the new lists hold only ints,
  // so there is no cycle to find, and every 700 new lists would otherwise trigger a collection that walks
  // the whole heap now and then.
  const GcPause no_gc;
  PyObject* result = PyList_New(static_cast<Py_ssize_t>(num_bins));
  if (result == nullptr) throw py::error_already_set();
  py::list out = py::reinterpret_steal<py::list>(result);
  for (size_t slot = 0; slot < num_bins; ++slot) {
    PyObject* bin = PyList_New(static_cast<Py_ssize_t>(offsets[slot + 1] - offsets[slot]));
    if (bin == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(result, static_cast<Py_ssize_t>(slot), bin);
    for (int64_t m = offsets[slot]; m < offsets[slot + 1]; ++m) {
      PyObject* item = PyLong_FromLong(static_cast<long>(items[static_cast<size_t>(m)]));
      if (item == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(bin, static_cast<Py_ssize_t>(m - offsets[slot]), item);
    }
  }
  return out;
}

py::tuple pack_flat(py::handle lengths, int64_t capacity, const std::string& algorithm, int64_t world_size,
                    bool shuffle, uint64_t seed) {
  const Packing p = pack_input(lengths, capacity, algorithm, world_size, shuffle, seed);
  py::array_t<int64_t> items(static_cast<py::ssize_t>(p.sorted.order.size()));
  py::array_t<int64_t> offsets(static_cast<py::ssize_t>(p.output_bins.size() + 1));
  int64_t* items_data = items.mutable_data();
  int64_t* offsets_data = offsets.mutable_data();
  {
    py::gil_scoped_release release;  // the two arrays are new and not visible to any other thread yet
    scatter(p, items_data, offsets_data);
  }
  return py::make_tuple(std::move(items), std::move(offsets));
}

}  // namespace

PYBIND11_MODULE(_packing_cpp, m) {
  m.doc() = "C++ bin packer behind dpo_fast.packing (use dpo_fast.packing.pack / pack_flat, not this module).";
  m.def("pack", &pack_lists, py::arg("lengths"), py::arg("capacity"), py::arg("algorithm"), py::arg("world_size"),
        py::arg("shuffle"), py::arg("seed"), "Bins as a list of lists of item indexes.");
  m.def("pack_flat", &pack_flat, py::arg("lengths"), py::arg("capacity"), py::arg("algorithm"),
        py::arg("world_size"), py::arg("shuffle"), py::arg("seed"),
        "(items, offsets): int64 arrays, the items of bin i are items[offsets[i]:offsets[i + 1]].");
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
