// What the kernels share: 16-float vectors, and one loop over work items on XLA's
// intra-op thread pool. Included by each .cc of the library (kernels/__init__.py).
#ifndef DIFFMAS_JAX_KERNELS_CPU_COMMON_H_
#define DIFFMAS_JAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace diffmas_kernels {

// One zmm register with AVX-512, two ymm with AVX2: the compiler picks the instructions
// for this machine (-march=native).
typedef float Vec16 __attribute__((vector_size(64), aligned(4)));

inline Vec16 Load(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// Runs item(i) for every i in [0, n) on the calling thread and up to pool.num_threads() - 1
// pool threads, and returns when all are done. Only the counters are owned jointly with
// the pool's tasks: a task that starts after the return claims no item, so it never
// touches `item` or what it refers to.
template <typename Item>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const Item& item) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const auto work = [counters, n, &item] {
    for (int64_t i; (i = counters->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      item(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(workers, n); ++t) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace diffmas_kernels

#endif  // DIFFMAS_JAX_KERNELS_CPU_COMMON_H_
