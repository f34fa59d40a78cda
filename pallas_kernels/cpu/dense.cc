// CPU kernels for float32 dense layers, called from JAX through the XLA FFI
// (`pallas_kernels.cpu`): XLA:CPU multiplies the transposed forms of a backward pass and
// batches of small Gram matrices well below the machine's rate (docs/kernels.md).
//
// Semantics (`reference.py` states them in jnp; the tests compare the two):
//   matmul:             c = op(a) @ op(b), op transposing the operand when asked; the
//                       sgemm of OpenBLAS (scipy-openblas32), whose address Python hands
//                       over once with RecsysSetSgemm.
//   pairwise_dots:      with v[b] = [x[b], emb[b, 0], ..., emb[b, F - 1]] (F + 1 vectors),
//                       out[b, p] = <v[b, i], v[b, j]> for the p-th pair i < j, in
//                       np.triu_indices(F + 1, 1) order (row-major over the upper triangle).
//   pairwise_dots_grad: dv[b, i] = sum over j != i of g[b, p(i, j)] * v[b, j], split back
//                       into dx (i = 0) and demb: the gradient of pairwise_dots given
//                       g = d loss / d out.

#include <atomic>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
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

// cblas_sgemm with 32-bit integers (scipy-openblas32's scipy_cblas_sgemm).
using Sgemm = void (*)(int order, int trans_a, int trans_b, int32_t m, int32_t n, int32_t k, float alpha,
                       const float* a, int32_t lda, const float* b, int32_t ldb, float beta, float* c, int32_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
std::atomic<Sgemm> sgemm{nullptr};

ffi::Error Matmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c, bool trans_a,
                  bool trans_b) {
  Sgemm fn = sgemm.load();
  if (fn == nullptr) return ffi::Error::Internal("matmul: no sgemm (RecsysSetSgemm was not called)");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("matmul: a and b must be 2-D");
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t kb = trans_b ? bd[1] : bd[0], n = trans_b ? bd[0] : bd[1];
  if (k != kb) {
    return ffi::Error::InvalidArgument("matmul: contracting sizes differ: " + std::to_string(k) + " and " +
                                       std::to_string(kb));
  }
  constexpr int64_t most = std::numeric_limits<int32_t>::max();
  if (m > most || n > most || k > most || ad[1] > most || bd[1] > most) {
    return ffi::Error::InvalidArgument("matmul: a dimension exceeds OpenBLAS's 32-bit sizes");
  }
  float* out = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(out, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  // OpenBLAS splits the work over the cores itself (its own threads beat one band per core).
  fn(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int32_t>(m),
     static_cast<int32_t>(n), static_cast<int32_t>(k), 1.0f, a.typed_data(), static_cast<int32_t>(ad[1]),
     b.typed_data(), static_cast<int32_t>(bd[1]), 0.0f, out, static_cast<int32_t>(n));
  return ffi::Error::Success();
}

#if defined(__AVX512F__)
// Written with AVX-512 intrinsics: GCC keeps such loops in 256-bit registers and left the
// accumulators below in memory, 5-10x slower.

// <a, b_k> for k < 4 at once, sharing the loads of a.
inline void Dot4(const float* a, const float* const* b, int64_t dim, float* out) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t d = 0;
  for (; d + 16 <= dim; d += 16) {
    const __m512 x = _mm512_loadu_ps(a + d);
    for (int k = 0; k < 4; ++k) acc[k] = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[k] + d), acc[k]);
  }
  if (d < dim) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (dim - d)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(mask, a + d);
    for (int k = 0; k < 4; ++k) acc[k] = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(mask, b[k] + d), acc[k]);
  }
  for (int k = 0; k < 4; ++k) out[k] = _mm512_reduce_add_ps(acc[k]);
}

inline float Dot(const float* a, const float* b, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  if (d < dim) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (dim - d)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + d), _mm512_maskz_loadu_ps(mask, b + d), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// dst[0:dim] = sum over j < n of c[j] * rows[j][0:dim], 64 columns at a time in registers.
inline void WeightedSum(const float* c, const float* const* rows, int64_t n, int64_t dim, float* dst) {
  int64_t d = 0;
  for (; d + 64 <= dim; d += 64) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < n; ++j) {
      const __m512 w = _mm512_set1_ps(c[j]);
      for (int k = 0; k < 4; ++k) acc[k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(rows[j] + d + 16 * k), acc[k]);
    }
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(dst + d + 16 * k, acc[k]);
  }
  for (; d < dim; d += 16) {
    const __mmask16 mask = dim - d >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (dim - d)) - 1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(c[j]), _mm512_maskz_loadu_ps(mask, rows[j] + d), acc);
    }
    _mm512_mask_storeu_ps(dst + d, mask, acc);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// The same loops eight lanes wide, for CPUs without AVX-512 (AMD Zen 3, for one). The
// plain C++ below them is not vectorized: its reductions would need reassociation.

// Lanes [0, n) set, for the masked loads and stores of a row's last n < 8 columns.
inline __m256i TailMask(int64_t n) {
  alignas(32) static const int32_t ones_then_zeros[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones_then_zeros + 8 - n));
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// <a, b_k> for k < 4 at once, sharing the loads of a.
inline void Dot4(const float* a, const float* const* b, int64_t dim, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    const __m256 x = _mm256_loadu_ps(a + d);
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[k] + d), acc[k]);
  }
  if (d < dim) {
    const __m256i mask = TailMask(dim - d);
    const __m256 x = _mm256_maskload_ps(a + d, mask);
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_ps(x, _mm256_maskload_ps(b[k] + d, mask), acc[k]);
  }
  for (int k = 0; k < 4; ++k) out[k] = HorizontalSum(acc[k]);
}

inline float Dot(const float* a, const float* b, int64_t dim) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  if (d < dim) {
    const __m256i mask = TailMask(dim - d);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + d, mask), _mm256_maskload_ps(b + d, mask), acc);
  }
  return HorizontalSum(acc);
}

// dst[0:dim] = sum over j < n of c[j] * rows[j][0:dim], 64 columns at a time in registers.
inline void WeightedSum(const float* c, const float* const* rows, int64_t n, int64_t dim, float* dst) {
  int64_t d = 0;
  for (; d + 64 <= dim; d += 64) {
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 w = _mm256_set1_ps(c[j]);
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(rows[j] + d + 8 * k), acc[k]);
    }
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst + d + 8 * k, acc[k]);
  }
  for (; d < dim; d += 8) {
    const __m256i mask = TailMask(dim - d >= 8 ? 8 : dim - d);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      acc = _mm256_fmadd_ps(_mm256_set1_ps(c[j]), _mm256_maskload_ps(rows[j] + d, mask), acc);
    }
    _mm256_maskstore_ps(dst + d, mask, acc);
  }
}
#else
inline float Dot(const float* a, const float* b, int64_t dim) {
  float sum = 0.0f;
  for (int64_t d = 0; d < dim; ++d) sum += a[d] * b[d];
  return sum;
}

inline void Dot4(const float* a, const float* const* b, int64_t dim, float* out) {
  for (int k = 0; k < 4; ++k) out[k] = Dot(a, b[k], dim);
}

inline void WeightedSum(const float* c, const float* const* rows, int64_t n, int64_t dim, float* dst) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < dim; ++d) dst[d] += c[j] * rows[j][d];
  }
}
#endif

// The vectors come in two arrays, x [batch, dim] (vector 0 of each sample) and emb
// [batch, features, dim] (vectors 1..features), so that neither direction copies them
// into one [batch, features + 1, dim] array first.
struct Vectors {
  const float* x;
  const float* emb;
  int64_t batch, features, dim;
  int64_t count() const { return features + 1; }
  int64_t pairs() const { return count() * (count() - 1) / 2; }
  const float* at(int64_t sample, int64_t i) const {
    return i == 0 ? x + sample * dim : emb + (sample * features + i - 1) * dim;
  }
};

ffi::Error ReadVectors(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& emb, const char* name, Vectors& v) {
  auto xd = x.dimensions();
  auto ed = emb.dimensions();
  if (xd.size() != 2 || ed.size() != 3 || xd[0] != ed[0] || xd[1] != ed[2]) {
    return ffi::Error::InvalidArgument(std::string(name) + ": x [batch, dim] and emb [batch, features, dim]");
  }
  v = Vectors{x.typed_data(), emb.typed_data(), ed[0], ed[1], ed[2]};
  return ffi::Error::Success();
}

ffi::Error PairwiseDots(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> emb, ffi::ResultBuffer<ffi::F32> out) {
  Vectors v;
  if (auto error = ReadVectors(x, emb, "pairwise_dots", v); error.failure()) return error;
  const int64_t pairs = v.pairs(), count = v.count();
  if (out->element_count() != v.batch * pairs) {
    return ffi::Error::InvalidArgument("pairwise_dots: out must be [batch, (features + 1) * features / 2]");
  }
  float* o = out->typed_data();
  ParallelFor(v.batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* dst = o + s * pairs;
      const float* rows[4];
      for (int64_t i = 0; i < count; ++i) {
        const float* a = v.at(s, i);
        int64_t j = i + 1;
        for (; j + 4 <= count; j += 4, dst += 4) {
          for (int k = 0; k < 4; ++k) rows[k] = v.at(s, j + k);
          Dot4(a, rows, v.dim, dst);
        }
        for (; j < count; ++j) *dst++ = Dot(a, v.at(s, j), v.dim);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error PairwiseDotsGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> emb, ffi::Buffer<ffi::F32> g,
                            ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> demb) {
  Vectors v;
  if (auto error = ReadVectors(x, emb, "pairwise_dots_grad", v); error.failure()) return error;
  const int64_t pairs = v.pairs(), count = v.count(), dim = v.dim;
  if (g.element_count() != v.batch * pairs || dx->element_count() != x.element_count() ||
      demb->element_count() != emb.element_count()) {
    return ffi::Error::InvalidArgument("pairwise_dots_grad: g [batch, pairs]; dx, demb like x, emb");
  }
  // pair[i * count + j]: the output position of the pair {i, j}, i != j.
  std::vector<int64_t> pair(count * count, -1);
  for (int64_t i = 0, p = 0; i < count; ++i) {
    for (int64_t j = i + 1; j < count; ++j, ++p) pair[i * count + j] = pair[j * count + i] = p;
  }
  const float* gs = g.typed_data();
  float* out_x = dx->typed_data();
  float* out_emb = demb->typed_data();
  ParallelFor(v.batch, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> coef(count);
    std::vector<const float*> rows(count);
    for (int64_t s = begin; s < end; ++s) {
      for (int64_t j = 0; j < count; ++j) rows[j] = v.at(s, j);
      for (int64_t i = 0; i < count; ++i) {
        for (int64_t j = 0; j < count; ++j) coef[j] = j == i ? 0.0f : gs[s * pairs + pair[i * count + j]];
        float* dst = i == 0 ? out_x + s * dim : out_emb + (s * v.features + i - 1) * dim;
        WeightedSum(coef.data(), rows.data(), count, dim, dst);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void RecsysSetSgemm(void* fn) { sgemm.store(reinterpret_cast<Sgemm>(fn)); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecsysMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecsysPairwiseDots, PairwiseDots,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecsysPairwiseDotsGrad, PairwiseDotsGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The x86-64 level this CPU runs (4, 3 or 2; 0 on other CPUs): the loader takes the
// library built for the highest level the CPU has (`pallas_kernels.cpu`).
extern "C" int RecsysCpuLevel() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return 4;
  if (__builtin_cpu_supports("x86-64-v3")) return 3;
  if (__builtin_cpu_supports("x86-64-v2")) return 2;
#elif defined(__x86_64__)
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (v4) return 4;
  if (v3) return 3;
  if (__builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt")) return 2;
#endif
  return 0;
}
