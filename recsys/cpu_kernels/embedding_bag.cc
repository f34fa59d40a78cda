// CPU kernels for the embedding lookup and its fused sparse update, called from JAX
// through the XLA FFI (`recsys.cpu_kernels`). XLA:CPU runs the backward's scatter-add on
// one thread and, in a step that also updates the tables in place, copies every gathered
// row before summing it; these split the work over the cores, sum each bag into its
// output row while the next bag's rows are prefetched, and apply row-wise Adagrad to each
// unique row in the same pass that sums that row's gradient.
//
// Semantics (the tests compare them with the XLA path):
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
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Worker threads per kernel call: RECSYS_CPU_KERNEL_THREADS, else one per core.
int64_t Workers() {
  static const int64_t workers = [] {
    const char* env = std::getenv("RECSYS_CPU_KERNEL_THREADS");
    const int64_t given = env ? std::atoll(env) : 0;
    return given > 0 ? given : std::max<int64_t>(1, std::thread::hardware_concurrency());
  }();
  return workers;
}

// Runs fn(begin, end) over [0, n) split into contiguous ranges, one per worker.
template <typename Fn>
void ParallelFor(int64_t n, int64_t min_per_worker, Fn fn) {
  int64_t workers = Workers();
  workers = std::min<int64_t>(workers, std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_worker)));
  if (workers <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  int64_t step = (n + workers - 1) / workers;
  for (int64_t w = 1; w < workers; ++w) {
    int64_t begin = std::min(n, w * step), end = std::min(n, (w + 1) * step);
    threads.emplace_back([=] { fn(begin, end); });
  }
  fn(int64_t{0}, std::min(n, step));
  for (auto& t : threads) t.join();
}

// out += c * row, over dim elements; written so the compiler vectorizes it.
inline void Axpy(float* __restrict out, const float* __restrict row, float c, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] += c * row[d];
}

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
          if (ahead >= 0 && ahead < rows) {
            const char* row = reinterpret_cast<const char*>(t + ahead * dim);
            for (int64_t b = 0; b < dim * 4; b += 64) __builtin_prefetch(row + b);
          }
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
                          ffi::ResultBuffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> acc, float lr, float eps,
                          float weight_decay) {
  auto tdims = table_in.dimensions();
  const int64_t rows = tdims[0], dim = tdims[1];
  const int64_t n = ids.element_count(), m = grads.dimensions()[0];
  if (grads.dimensions()[1] != dim || acc_in.element_count() != rows) {
    return ffi::Error::InvalidArgument("rowwise_adagrad: grads [m, dim] and acc [rows] must match the table");
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

  // Occurrences grouped by row, in batch order within a row (so sums are deterministic):
  // a counting sort when the table is not much larger than the batch, a sort otherwise.
  for (int64_t i = 0; i < n; ++i) {
    const int32_t r = id[i];
    if (r >= rows || (r >= 0 && (s[i] < 0 || s[i] >= m))) {
      return ffi::Error::InvalidArgument("rowwise_adagrad: occurrence " + std::to_string(i) + " has id " +
                                         std::to_string(r) + " / gradient row " + std::to_string(s[i]) +
                                         " outside the table's " + std::to_string(rows) + " rows / " +
                                         std::to_string(m) + " gradient rows");
    }
  }
  std::vector<int64_t> order;    // occurrence indices, grouped by row
  std::vector<int64_t> starts;   // where each unique row's occurrences begin in `order`
  std::vector<int64_t> touched;  // the unique rows, ascending
  if (rows <= 8 * n) {
    std::vector<int64_t> first(rows + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (id[i] >= 0) ++first[id[i] + 1];
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (first[r + 1] > 0) touched.push_back(r);
      first[r + 1] += first[r];
    }
    order.resize(first[rows]);
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
      if (id[i] >= 0) order[next[id[i]]++] = i;
    }
    for (int64_t r : touched) starts.push_back(first[r]);
    starts.push_back(first[rows]);
  } else {
    std::vector<uint64_t> keys;
    keys.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      if (id[i] >= 0) keys.push_back((static_cast<uint64_t>(id[i]) << 32) | static_cast<uint64_t>(i));
    }
    std::sort(keys.begin(), keys.end());
    order.resize(keys.size());
    for (size_t k = 0; k < keys.size(); ++k) {
      order[k] = static_cast<int64_t>(keys[k] & 0xffffffffu);
      const int64_t r = static_cast<int64_t>(keys[k] >> 32);
      if (k == 0 || r != static_cast<int64_t>(keys[k - 1] >> 32)) {
        touched.push_back(r);
        starts.push_back(static_cast<int64_t>(k));
      }
    }
    starts.push_back(static_cast<int64_t>(keys.size()));
  }
  const int64_t unique = static_cast<int64_t>(touched.size());
  ParallelFor(unique, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(dim);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = touched[u];
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t k = starts[u]; k < starts[u + 1]; ++k) {
        const int64_t i = order[k];
        Axpy(sum.data(), g + static_cast<int64_t>(s[i]) * dim, c[i], dim);
      }
      float* row = w + r * dim;
      if (weight_decay != 0.0f) Axpy(sum.data(), row, weight_decay, dim);
      float square = 0.0f;
      for (int64_t d = 0; d < dim; ++d) square += sum[d] * sum[d];
      a[r] += square / static_cast<float>(dim);
      const float scale = lr / (std::sqrt(a[r]) + eps);
      Axpy(row, sum.data(), -scale, dim);
    }
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("lr")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));
