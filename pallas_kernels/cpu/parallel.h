// The worker threads the CPU kernels split their loops over (embedding_bag.cc, dense.cc).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace recsys {

// Worker threads per kernel call: RECSYS_CPU_KERNEL_THREADS, else one per core.
inline int64_t Workers() {
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

}  // namespace recsys
