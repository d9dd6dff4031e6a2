// One query per row and head group against one block of cached keys and values, read in
// place: the partial softmax statistics of a decode or latent step (layers.py merges the
// blocks). XLA:CPU runs this as a few small products per layer that read the keys and
// values at about half the memory bandwidth, copies a stacked cache's layer out first,
// and reads every slot, filled or not (docs/performance.md, ninth pass).
//
// q [B, K, G, Dh] (pre-scaled); values [L, B, K, S, Dh], keys alike or [L, B, K, Dh, S]
// (keys_transposed), of which layer `layer` is read; mask [B, S]. Returns, per (b, k, g):
// m = the largest visible score, l = the sum of exp(s - m) and o = the sum of
// exp(s - m) v over the visible slots. A row that sees no slot of the block gets
// m = kMaskValue, l = S and o = the sum of all S values: the uniform average that
// layers._attend_blocks gives such a row (masked scores there are kMaskValue, finite).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using diffmas_kernels::Load;
using diffmas_kernels::Store;
using diffmas_kernels::Vec16;

constexpr float kMaskValue = -2.38e38f;  // layers.MASK_VALUE
constexpr int64_t kChunk = 128;          // slots per work item
typedef float Vec8 __attribute__((vector_size(32), aligned(4)));
typedef float Vec4 __attribute__((vector_size(16), aligned(4)));
typedef int32_t Int16 __attribute__((vector_size(64), aligned(4)));

// A tree of halves: a 16-term chain of dependent adds would cost more than the loads.
inline float Sum(Vec16 v) {
  Vec8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
  a += b;
  Vec4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// exp(x) for x <= 0 (scores minus their maximum), 0 below -87: Cephes' expf polynomial.
inline Vec16 ExpNonPositive(Vec16 x) {
  const Vec16 clamped = x < -87.f ? Vec16{} - 87.f : x;
  const Vec16 t = clamped * 1.44269504088896341f;
  const Int16 n = __builtin_convertvector(t - 0.5f, Int16);  // round(t), t <= 0
  const Vec16 nf = __builtin_convertvector(n, Vec16);
  const Vec16 r = clamped - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  Vec16 scale;
  const Int16 bits = (n + 127) << 23;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? Vec16{} : p * scale;
}

// Scores of the visible slots in [first, last) of a chunk, keys [S, Dh] rows; one query
// head g at a time, so the chunk's keys come from L1 for the next heads.
template <int DV>
void ScoresRows(const float* q, int64_t G, const float* keys, const bool* mask, int64_t first,
                int64_t last, float* s, int64_t width) {
  for (int64_t g = 0; g < G; ++g) {
    Vec16 qv[DV];
    for (int v = 0; v < DV; ++v) qv[v] = Load(q + (g * DV + v) * 16);
    for (int64_t j = first; j < last; ++j) {
      if (!mask[j]) continue;
      const float* kj = keys + j * DV * 16;
      Vec16 acc = qv[0] * Load(kj);
      for (int v = 1; v < DV; ++v) acc += qv[v] * Load(kj + v * 16);
      s[g * width + j] = Sum(acc);
    }
  }
}

// Keys [Dh, S] (row stride S): 64 slots at a time in four independent accumulators,
// no horizontal sums. Masked slots get scores too; the caller drops them.
template <int DV>
void ScoresTransposed(const float* q, int64_t G, const float* keys_t, int64_t S, int64_t first,
                      int64_t last, float* s, int64_t width) {
  constexpr int64_t D = DV * 16;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float* sg = s + g * width;
    int64_t j = first;
    for (; j + 64 <= last; j += 64) {
      Vec16 a0{}, a1{}, a2{}, a3{};
      for (int64_t d = 0; d < D; ++d) {
        const float* row = keys_t + d * S + j;
        a0 += qg[d] * Load(row), a1 += qg[d] * Load(row + 16);
        a2 += qg[d] * Load(row + 32), a3 += qg[d] * Load(row + 48);
      }
      Store(sg + j, a0), Store(sg + j + 16, a1), Store(sg + j + 32, a2), Store(sg + j + 48, a3);
    }
    for (; j + 16 <= last; j += 16) {
      Vec16 a{};
      for (int64_t d = 0; d < D; ++d) a += qg[d] * Load(keys_t + d * S + j);
      Store(sg + j, a);
    }
    for (; j < last; ++j) {
      float a = 0.f;
      for (int64_t d = 0; d < D; ++d) a += qg[d] * keys_t[d * S + j];
      sg[j] = a;
    }
  }
}

// out[g] = sum over visible j of p[g, j] v_j, accumulated in registers.
template <int DV>
void WeightedValues(const float* p, int64_t G, const float* values, const bool* mask,
                    int64_t first, int64_t last, int64_t width, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    Vec16 acc[DV] = {};
    const float* pg = p + g * width;
    for (int64_t j = first; j < last; ++j) {
      if (!mask[j]) continue;
      const float* vj = values + j * DV * 16;
      for (int v = 0; v < DV; ++v) acc[v] += pg[j] * Load(vj + v * 16);
    }
    for (int v = 0; v < DV; ++v) Store(out + (g * DV + v) * 16, acc[v]);
  }
}

template <int DV>
struct Chunk {
  // One (b, k, slot chunk): the statistics of its visible slots (see the file comment).
  static void Run(const float* q, int64_t G, const float* keys, bool keys_transposed, int64_t S,
                  const float* values, const bool* mask, int64_t n, bool row_sees_any,
                  std::vector<float>& s, float* po, float* pm, float* pl) {
    constexpr int64_t D = DV * 16;
    if (!row_sees_any) {  // uniform over every slot: m = kMaskValue, exp(0) = 1 each
      std::vector<float> ones(G * n, 1.f);
      std::vector<char> all(n, 1);
      WeightedValues<DV>(ones.data(), G, values, reinterpret_cast<const bool*>(all.data()), 0, n,
                         n, po);
      for (int64_t g = 0; g < G; ++g) pm[g] = kMaskValue, pl[g] = static_cast<float>(n);
      return;
    }
    const int64_t first = std::find(mask, mask + n, true) - mask;
    if (first == n) {  // an empty stretch of a row that sees other slots: weight 0
      std::fill(po, po + G * D, 0.f);
      for (int64_t g = 0; g < G; ++g) pm[g] = -INFINITY, pl[g] = 0.f;
      return;
    }
    int64_t last = n;
    while (!mask[last - 1]) --last;
    const int64_t width = (n + 15) / 16 * 16;
    s.assign(G * width, -INFINITY);
    if (keys_transposed) {
      ScoresTransposed<DV>(q, G, keys, S, first, last, s.data(), width);
      for (int64_t j = first; j < last; ++j)
        if (!mask[j])
          for (int64_t g = 0; g < G; ++g) s[g * width + j] = -INFINITY;
    } else {
      ScoresRows<DV>(q, G, keys, mask, first, last, s.data(), width);
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s.data() + g * width;
      Vec16 top16 = Load(sg);
      for (int64_t j = 16; j < width; j += 16) {
        const Vec16 x = Load(sg + j);
        top16 = x > top16 ? x : top16;
      }
      float top = top16[0];
      for (int i = 1; i < 16; ++i) top = std::max(top, top16[i]);
      Vec16 total{};
      for (int64_t j = 0; j < width; j += 16) {
        const Vec16 p = ExpNonPositive(Load(sg + j) - top);  // -inf (masked, padding) -> 0
        Store(sg + j, p);
        total += p;
      }
      pm[g] = top;
      pl[g] = Sum(total);
    }
    WeightedValues<DV>(s.data(), G, values, mask, first, last, width, po);
  }
};

struct Job {
  const float *q, *keys, *values;
  const bool* mask;
  float *o, *m, *l;                           // outputs [B, K, G(, Dh)]
  std::vector<float> part_o, part_m, part_l;  // per work item [G(, Dh)]
  std::vector<char> row_sees_any;             // [B]
  int64_t B, K, G, S, D, chunks_per_head, num_items;
  bool keys_transposed;

  void Item(int64_t item) {
    thread_local std::vector<float> s;  // the chunk's scores, then probabilities
    const int64_t c = item % chunks_per_head, bk = item / chunks_per_head, b = bk / K;
    const int64_t s0 = c * kChunk, n = std::min(S, s0 + kChunk) - s0;
    const float* keys_at = keys + (keys_transposed ? bk * D * S + s0 : (bk * S + s0) * D);
    const auto run = [&](auto chunk) {
      chunk.Run(q + bk * G * D, G, keys_at, keys_transposed, S, values + (bk * S + s0) * D,
                mask + b * S + s0, n, row_sees_any[b], s, part_o.data() + item * G * D,
                part_m.data() + item * G, part_l.data() + item * G);
    };
    switch (D) {
      case 16: return run(Chunk<1>{});
      case 32: return run(Chunk<2>{});
      case 64: return run(Chunk<4>{});
      case 128: return run(Chunk<8>{});
    }
  }

  // Chunks of one (b, k) merged: rescaled to the largest maximum.
  void Merge() {
    for (int64_t bk = 0; bk < B * K; ++bk) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t first = bk * chunks_per_head;
        float top = -INFINITY;
        for (int64_t c = 0; c < chunks_per_head; ++c) top = std::max(top, part_m[(first + c) * G + g]);
        float total = 0.f;
        float* out = o + (bk * G + g) * D;
        std::fill(out, out + D, 0.f);
        for (int64_t c = 0; c < chunks_per_head; ++c) {
          const int64_t item = first + c;
          const float pm = part_m[item * G + g];
          if (pm == -INFINITY) continue;
          const float w = std::exp(pm - top);
          total += w * part_l[item * G + g];
          const float* po = part_o.data() + (item * G + g) * D;
          for (int64_t d = 0; d < D; ++d) out[d] += w * po[d];
        }
        m[bk * G + g] = top;
        l[bk * G + g] = total;
      }
    }
  }
};

ffi::Error PartialAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                                ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> layer,
                                bool keys_transposed, ffi::ResultBuffer<ffi::F32> o,
                                ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> l) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  const auto md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || md.size() != 2 ||
      !std::equal(kd.begin(), kd.begin() + 3, vd.begin()) || vd[1] != qd[0] ||
      vd[2] != qd[1] || vd[4] != qd[3] ||
      (qd[3] != 16 && qd[3] != 32 && qd[3] != 64 && qd[3] != 128) || md[0] != qd[0] || md[1] != vd[3] ||
      kd[3] != (keys_transposed ? vd[4] : vd[3]) || kd[4] != (keys_transposed ? vd[3] : vd[4]) ||
      layer.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "partial_attention: expected q [B, K, G, Dh] (Dh 16, 32, 64 or 128), values "
        "[L, B, K, S, Dh], keys like values or [L, B, K, Dh, S] (keys_transposed), "
        "mask [B, S] and a layer index");
  }
  const int64_t index = layer.typed_data()[0];
  if (index < 0 || index >= kd[0]) {
    return ffi::Error::InvalidArgument("partial_attention: layer index out of range");
  }
  Job job;
  job.B = qd[0], job.K = qd[1], job.G = qd[2], job.D = qd[3], job.S = vd[3];
  job.keys_transposed = keys_transposed;
  const int64_t layer_size = job.B * job.K * job.S * job.D;
  job.q = q.typed_data();
  job.keys = keys.typed_data() + index * layer_size;
  job.values = values.typed_data() + index * layer_size;
  job.mask = mask.typed_data();
  job.o = o->typed_data(), job.m = m->typed_data(), job.l = l->typed_data();
  job.chunks_per_head = std::max<int64_t>(1, (job.S + kChunk - 1) / kChunk);
  job.num_items = job.B * job.K * job.chunks_per_head;
  job.part_o.resize(job.num_items * job.G * job.D);
  job.part_m.resize(job.num_items * job.G);
  job.part_l.resize(job.num_items * job.G);
  job.row_sees_any.resize(job.B);
  for (int64_t b = 0; b < job.B; ++b) {
    const bool* row = job.mask + b * job.S;
    job.row_sees_any[b] = std::any_of(row, row + job.S, [](bool x) { return x; });
  }
  if (job.S == 0) {
    std::fill(job.o, job.o + job.B * job.K * job.G * job.D, 0.f);
    std::fill(job.m, job.m + job.B * job.K * job.G, kMaskValue);
    std::fill(job.l, job.l + job.B * job.K * job.G, 0.f);
    return ffi::Error::Success();
  }
  diffmas_kernels::ParallelFor(pool, job.num_items, [&job](int64_t i) { job.Item(i); });
  job.Merge();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffmasPartialAttention, PartialAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("keys_transposed")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
