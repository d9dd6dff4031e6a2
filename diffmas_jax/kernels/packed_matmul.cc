// y[M, N] = x[M, K] @ W[K, N] for a weight stored as column panels P[N / 32, K, 32]
// (kernels/__init__.py packs it once at load). Each panel is one contiguous 72-288 KB
// stream, so a decode step reads every weight front to back once, on all of XLA's
// intra-op threads. XLA:CPU's own narrow products read the [K, N] layout at 60-80% of
// the bandwidth at one row and about half at eight (docs/performance.md, eighth pass).
#include <algorithm>
#include <cstdint>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using diffmas_kernels::Load;
using diffmas_kernels::Store;
using diffmas_kernels::Vec16;

constexpr int64_t kPanel = 32;
// A panel row is two Vec16s.
#if defined(__AVX512F__)
constexpr int64_t kRows = 8;  // 16 accumulators of 32 registers
#else
constexpr int64_t kRows = 4;  // 8 accumulator pairs fit 16 ymm registers
#endif

// R rows of x against one panel: y[r, 0:32] = sum_k x[r, k] * panel[k, 0:32].
template <int64_t R>
void PanelRows(const float* x, int64_t K, const float* panel, float* y, int64_t N) {
  Vec16 lo[R], hi[R];
  for (int64_t r = 0; r < R; ++r) lo[r] = hi[r] = Vec16{};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    __builtin_prefetch(w + 16 * kPanel);
    const Vec16 w_lo = Load(w), w_hi = Load(w + 16);
    for (int64_t r = 0; r < R; ++r) {
      const float xr = x[r * K + k];
      lo[r] += xr * w_lo;
      hi[r] += xr * w_hi;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    Store(y + r * N, lo[r]);
    Store(y + r * N + 16, hi[r]);
  }
}

// The last M % kRows rows in one pass over the panel.
void TailRows(int64_t rows, const float* x, int64_t K, const float* panel, float* y, int64_t N) {
  switch (rows) {
    case 1: return PanelRows<1>(x, K, panel, y, N);
    case 2: return PanelRows<2>(x, K, panel, y, N);
    case 3: return PanelRows<3>(x, K, panel, y, N);
#if defined(__AVX512F__)
    case 4: return PanelRows<4>(x, K, panel, y, N);
    case 5: return PanelRows<5>(x, K, panel, y, N);
    case 6: return PanelRows<6>(x, K, panel, y, N);
    case 7: return PanelRows<7>(x, K, panel, y, N);
#endif
  }
}

void Panels(const float* x, int64_t M, int64_t K, const float* panels, int64_t p0, int64_t p1,
            float* y, int64_t N) {
  // Row blocks inside the panel loop: a panel is read from memory once and from cache
  // by the other row blocks.
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = panels + p * K * kPanel;
    float* yp = y + p * kPanel;
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) PanelRows<kRows>(x + m * K, K, panel, yp + m * N, N);
    if (m < M) TailRows(M - m, x + m * K, K, panel, yp + m * N, N);
  }
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = panels.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != kPanel || pd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("packed_matmul: expected x [M, K] and panels [P, K, 32]");
  }
  const int64_t M = xd[0], K = xd[1], num_panels = pd[0], N = num_panels * kPanel;
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  // About four chunks per worker, so a thread that starts late still finds work.
  const int64_t chunk = std::max<int64_t>(1, num_panels / (4 * workers));
  diffmas_kernels::ParallelFor(pool, (num_panels + chunk - 1) / chunk, [&](int64_t c) {
    Panels(x.typed_data(), M, K, panels.typed_data(), c * chunk,
           std::min(num_panels, (c + 1) * chunk), y->typed_data(), N);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffmasPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
