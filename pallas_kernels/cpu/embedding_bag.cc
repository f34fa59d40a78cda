// CPU kernels for the embedding lookup and its fused sparse update, called from JAX
// through the XLA FFI (`pallas_kernels.cpu`). XLA:CPU runs the backward's scatter-add on
// one thread and, in a step that also updates the tables in place, copies every gathered
// row before summing it; these split the work over the cores, sum each bag into its
// output row while the next bag's rows are prefetched, and apply row-wise Adagrad to each
// unique row in the same pass that sums that row's gradient.
//
// Semantics (`reference.py` states them in jnp; the tests compare the two):
//   pooled_lookup:   out[b, f] = sum_l coef[f, b, l] * table[ids[f, b, l]]; positions
//                    with coef == 0 (padding) are skipped and never read.
//   rowwise_adagrad: for every row r among the valid ids (id >= 0):
//                      g = sum over occurrences i of r: coef[i] * grads[src[i]]
//                          (+ weight_decay * table[r]),
//                      acc[r] += mean(g * g);  table[r] -= lr * g / (sqrt(acc[r]) + eps)
//                    Occurrences are summed in their order in the batch.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using recsys::ParallelFor;

// out += c * row, over dim elements; written so the compiler vectorizes it.
inline void Axpy(float* __restrict out, const float* __restrict row, float c, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] += c * row[d];
}

// sum over d of x[d]^2, in 16 lanes added in a fixed order (deterministic, and
// vectorized: one running sum cannot be without reordering its additions).
inline float SumOfSquares(const float* __restrict x, int64_t dim) {
  constexpr int kLanes = 16;
  float lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) lane[k] += x[d + k] * x[d + k];
  }
  for (int k = 0; d < dim; ++d, ++k) lane[k] += x[d] * x[d];
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += lane[k];
  return total;
}

// Asks for every cache line of a row of dim floats (the lookup's next bag, the update's
// next rows).
inline void PrefetchRow(const float* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * 4; b += 64) __builtin_prefetch(p + b);
}

// An occurrence as rowwise_adagrad's update reads it: its gradient row and factor, copied
// out of src and coef while those are read in order, so that the update does not chase
// an occurrence index into them at random.
struct Occurrence {
  int32_t src;
  float coef;
};
// An occurrence on its way through the bucket pass: the row's low bits as well.
struct Staged {
  uint32_t low;
  Occurrence occurrence;
};
// One row's occurrences: positions [start, start + count) of the grouped order.
struct Run {
  int64_t row, start, count;
};
// How far ahead rowwise_adagrad prefetches: table rows (runs), and gradient rows within one.
constexpr size_t kPrefetchRuns = 4;
constexpr int64_t kPrefetchOccurrences = 4;

// rowwise_adagrad groups occurrences by row in buckets of 2^kBucketBits rows.
constexpr int kBucketBits = 16;
constexpr int64_t kBucketMask = (int64_t{1} << kBucketBits) - 1;

// ids and coef are bag-major by feature ([features * batch, bag]: all of feature 0's bags,
// then feature 1's), so consecutive bags read the same table and its hot rows stay in
// cache; the output is [batch, features, dim], ready for the model.
ffi::Error PooledLookup(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> coef,
                        ffi::ResultBuffer<ffi::F32> out, int64_t features) {
  auto tdims = table.dimensions();
  auto idims = ids.dimensions();
  if (tdims.size() != 2 || idims.size() != 2 || coef.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("pooled_lookup: table [rows, dim], ids and coef [n, bag]");
  }
  const int64_t rows = tdims[0], dim = tdims[1], n = idims[0], bag = idims[1];
  if (features < 1 || n % features != 0) {
    return ffi::Error::InvalidArgument("pooled_lookup: bags must split evenly over the features");
  }
  const int64_t batch = n / features;
  const float* t = table.typed_data();
  const int32_t* id = ids.typed_data();
  const float* c = coef.typed_data();
  float* o = out->typed_data();
  std::atomic<int64_t> bad{-1};  // some out-of-range position, reported after the loop
  ParallelFor(n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* dst = o + ((i % batch) * features + i / batch) * dim;
      std::memset(dst, 0, sizeof(float) * dim);
      if (i + 1 < end) {  // the next bag's rows, while this one is summed
        for (int64_t l = 0; l < bag; ++l) {
          const int64_t ahead = id[(i + 1) * bag + l];
          if (ahead >= 0 && ahead < rows) PrefetchRow(t + ahead * dim, dim);
        }
      }
      for (int64_t l = 0; l < bag; ++l) {
        const float w = c[i * bag + l];
        if (w == 0.0f) continue;
        const int64_t r = id[i * bag + l];
        if (r < 0 || r >= rows) {
          bad.store(i * bag + l, std::memory_order_relaxed);
          continue;
        }
        Axpy(dst, t + r * dim, w, dim);
      }
    }
  });
  const int64_t where = bad.load();
  if (where >= 0) {
    return ffi::Error::InvalidArgument("pooled_lookup: id " + std::to_string(id[where]) + " at flat position " +
                                       std::to_string(where) + " is outside the table's " +
                                       std::to_string(rows) + " rows");
  }
  return ffi::Error::Success();
}

ffi::Error RowwiseAdagrad(ffi::Buffer<ffi::F32> table_in, ffi::Buffer<ffi::F32> acc_in, ffi::Buffer<ffi::S32> ids,
                          ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32> src, ffi::Buffer<ffi::F32> grads,
                          ffi::Buffer<ffi::F32> learning_rate, ffi::ResultBuffer<ffi::F32> table,
                          ffi::ResultBuffer<ffi::F32> acc, float eps, float weight_decay) {
  // The rate is an operand, not an attribute: a schedule changes it every step.
  if (learning_rate.element_count() != 1) {
    return ffi::Error::InvalidArgument("rowwise_adagrad: the learning rate must be one float");
  }
  const float lr = learning_rate.typed_data()[0];
  auto tdims = table_in.dimensions();
  const int64_t rows = tdims[0], dim = tdims[1];
  const int64_t n = ids.element_count(), m = grads.dimensions()[0];
  if (grads.dimensions()[1] != dim || acc_in.element_count() != rows) {
    return ffi::Error::InvalidArgument("rowwise_adagrad: grads [m, dim] and acc [rows] must match the table");
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument("rowwise_adagrad: more than 2^31 - 1 occurrences");
  }
  float* w = table->typed_data();
  float* a = acc->typed_data();
  // The results alias the inputs (input_output_aliases); copy only if XLA did not.
  if (w != table_in.typed_data()) std::memcpy(w, table_in.typed_data(), sizeof(float) * rows * dim);
  if (a != acc_in.typed_data()) std::memcpy(a, acc_in.typed_data(), sizeof(float) * rows);
  const int32_t* id = ids.typed_data();
  const float* c = coef.typed_data();
  const int32_t* s = src.typed_data();
  const float* g = grads.typed_data();

  for (int64_t i = 0; i < n; ++i) {
    const int32_t r = id[i];
    if (r >= rows || (r >= 0 && (s[i] < 0 || s[i] >= m))) {
      return ffi::Error::InvalidArgument("rowwise_adagrad: occurrence " + std::to_string(i) + " has id " +
                                         std::to_string(r) + " / gradient row " + std::to_string(s[i]) +
                                         " outside the table's " + std::to_string(rows) + " rows / " +
                                         std::to_string(m) + " gradient rows");
    }
  }
  // Occurrences grouped by row, in batch order within a row (so sums are deterministic).
  std::vector<Occurrence> order;
  // Sums row r's gradient over its `count` occurrences and applies the update to the row.
  auto update_row = [&](int64_t r, const Occurrence* occurrences, int64_t count, float* sum) {
    std::fill(sum, sum + dim, 0.0f);
    for (int64_t k = 0; k < count; ++k) {
      if (k + kPrefetchOccurrences < count) {
        PrefetchRow(g + static_cast<int64_t>(occurrences[k + kPrefetchOccurrences].src) * dim, dim);
      }
      Axpy(sum, g + static_cast<int64_t>(occurrences[k].src) * dim, occurrences[k].coef, dim);
    }
    float* row = w + r * dim;
    if (weight_decay != 0.0f) Axpy(sum, row, weight_decay, dim);
    a[r] += SumOfSquares(sum, dim) / static_cast<float>(dim);
    const float scale = lr / (std::sqrt(a[r]) + eps);
    Axpy(row, sum, -scale, dim);
  };
  // Updates the rows of `runs` in turn while later runs' table rows and first gradient
  // rows are prefetched: both lie scattered over memory.
  auto update_runs = [&](const std::vector<Run>& runs, float* sum) {
    auto prefetch = [&](const Run& run) {
      PrefetchRow(w + run.row * dim, dim);
      __builtin_prefetch(a + run.row);
      for (int64_t k = 0; k < std::min(run.count, kPrefetchOccurrences); ++k) {
        PrefetchRow(g + static_cast<int64_t>(order[run.start + k].src) * dim, dim);
      }
    };
    const size_t ahead = std::min(runs.size(), kPrefetchRuns);
    for (size_t u = 0; u < ahead; ++u) prefetch(runs[u]);
    for (size_t u = 0; u < runs.size(); ++u) {
      if (u + ahead < runs.size()) prefetch(runs[u + ahead]);
      update_row(runs[u].row, order.data() + runs[u].start, runs[u].count, sum);
    }
  };

  // When the table is not much larger than the batch: a counting sort in two levels, all
  // of it split over the cores. Occurrences go to buckets of 2^16 rows first, then each
  // bucket is counted out with an array that stays in L2 (one array over all rows misses
  // the cache on every count). Its cost grows with the rows too; up to 32x as many rows
  // as occurrences it beats the one-core sort below (docs/kernels.md).
  if (rows <= 32 * n) {
    const int64_t buckets = (rows >> kBucketBits) + 1;
    const int64_t chunks = std::min<int64_t>(recsys::Workers(), std::max<int64_t>(1, n / 4096));
    const int64_t chunk = (n + chunks - 1) / chunks;
    std::vector<int64_t> place(chunks * buckets, 0);  // [chunk, bucket]: counts, then positions
    ParallelFor(chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        for (int64_t i = ch * chunk; i < std::min(n, (ch + 1) * chunk); ++i) {
          if (id[i] >= 0) ++place[ch * buckets + (id[i] >> kBucketBits)];
        }
      }
    });
    std::vector<int64_t> bucket_start(buckets + 1, 0);
    for (int64_t b = 0, at = 0; b < buckets; ++b) {
      bucket_start[b] = at;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const int64_t count = place[ch * buckets + b];
        place[ch * buckets + b] = at;
        at += count;
      }
      bucket_start[b + 1] = at;
    }
    std::vector<Staged> staged(bucket_start[buckets]);
    order.resize(bucket_start[buckets]);
    ParallelFor(chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        int64_t* next = place.data() + ch * buckets;
        for (int64_t i = ch * chunk; i < std::min(n, (ch + 1) * chunk); ++i) {
          if (id[i] >= 0) {
            staged[next[id[i] >> kBucketBits]++] = {static_cast<uint32_t>(id[i] & kBucketMask), {s[i], c[i]}};
          }
        }
      }
    });
    ParallelFor(buckets, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> first((1 << kBucketBits) + 1);
      std::vector<float> sum(dim);
      std::vector<Run> runs;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t lo = bucket_start[b], hi = bucket_start[b + 1];
        if (lo == hi) continue;
        std::fill(first.begin(), first.end(), 0);
        for (int64_t k = lo; k < hi; ++k) ++first[staged[k].low + 1];
        for (int64_t low = 0; low < (1 << kBucketBits); ++low) first[low + 1] += first[low];
        for (int64_t k = lo; k < hi; ++k) order[lo + first[staged[k].low]++] = staged[k].occurrence;
        // first[low] now ends row low's occurrences; they start where the previous ended.
        runs.clear();
        for (int64_t low = 0, from = 0; low < (1 << kBucketBits); ++low) {
          const int64_t to = first[low];
          if (to > from) runs.push_back({(b << kBucketBits) + low, lo + from, to - from});
          from = to;
        }
        update_runs(runs, sum.data());
      }
    });
    return ffi::Error::Success();
  }
  // A table much larger than the batch: sort (row, occurrence) keys.
  std::vector<uint64_t> keys;
  keys.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (id[i] >= 0) keys.push_back((static_cast<uint64_t>(id[i]) << 32) | static_cast<uint64_t>(i));
  }
  std::sort(keys.begin(), keys.end());
  order.resize(keys.size());
  std::vector<int64_t> starts;
  for (size_t k = 0; k < keys.size(); ++k) {
    const int64_t i = static_cast<int64_t>(keys[k] & 0xffffffffu);
    order[k] = {s[i], c[i]};
    if (k == 0 || (keys[k] >> 32) != (keys[k - 1] >> 32)) starts.push_back(static_cast<int64_t>(k));
  }
  starts.push_back(static_cast<int64_t>(keys.size()));
  const int64_t unique = static_cast<int64_t>(starts.size()) - 1;
  ParallelFor(unique, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(dim);
    std::vector<Run> runs;
    runs.reserve(end - begin);
    for (int64_t u = begin; u < end; ++u) {
      runs.push_back({static_cast<int64_t>(keys[starts[u]] >> 32), starts[u], starts[u + 1] - starts[u]});
    }
    update_runs(runs, sum.data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecsysPooledLookup, PooledLookup,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("features"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecsysRowwiseAdagrad, RowwiseAdagrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));
