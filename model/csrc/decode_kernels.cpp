// Decode-step matrix products y = x @ W.T + b for a few rows of x, with W prepacked at load time.
//
// A decode step reads every weight once per token, so these products are bound by memory bandwidth:
// the kernels stream each weight block once and reuse it for every row from cache.
//
// Batch invariance by construction: every output element is one chain of multiply-adds over k = 0,
// 1, ..., K-1 starting from zero, then the bias (int8: exact integer sums, then the scales). A row
// goes through the same instructions whatever the row count: rows are tiled only to share weight
// loads, each row keeps accumulators of its own, and threads split the outputs, never k.
//
// Weights come packed by model/decode_linear.py in blocks of BLOCK outputs, k-major inside a block,
// so one block is one contiguous stream: fp32 (blocks, K, 64); bf16 (blocks, K/2, 64, 2), pairs of k
// as vdpbf16ps reads them; int8 (blocks, K/4, 64, 4), quads of k as vpdpbusd reads them.
//
// Paths (chosen by the caller, each compiled for its own instruction set and run only where the CPU
// has it): SCALAR portable C++; AVX2 (+FMA); AVX512 (F+BW); AVX512_DOT (AVX512-BF16 vdpbf16ps and
// AVX512-VNNI vpdpbusd). AVX2 and AVX512 give the same bits (the same fused multiply-add chain);
// SCALAR rounds the product before the add; AVX512_DOT multiplies bf16 pairs (bf16 weights) and
// byte quads (int8 weights), and is AVX512 for fp32 weights.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64;   // outputs per packed block
constexpr int64_t CHUNK_BYTES = 32 << 10;  // weights per pass over a block: in L1 while every row tile reads them
constexpr int TILE = 4;         // rows sharing one load of weights

enum Path : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_DOT = 3 };

bool path_supported(int64_t path) {
  __builtin_cpu_init();
  switch (path) {
    case SCALAR:
      return true;
    case AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    case AVX512_DOT:
      return path_supported(AVX512) && __builtin_cpu_supports("avx512bf16") &&
             __builtin_cpu_supports("avx512vnni");
    default:
      return false;
  }
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch converts fp32 to bf16.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// Every step of the AVX-512 loops reads 256 bytes of one block's stream. With a full tile of rows,
// asking for the bytes a few kilobytes ahead keeps memory busy while the multiply-adds run (the
// hardware prefetcher alone left batch-8 steps waiting on memory); one row keeps up without it.
constexpr int64_t PREFETCH_STEPS = 32;

__attribute__((target("avx512f"))) inline void prefetch_step(const void* step) {
  const char* p = static_cast<const char*>(step) + PREFETCH_STEPS * 256;
  for (int line = 0; line < 4; line++) _mm_prefetch(p + 64 * line, _MM_HINT_T0);
}

// ---- fp32 weights: acc[r][j] += x[r][k] * w[k][j] for k in [k0, k1) ----

template <int R>
void f32_scalar(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, float* acc) {
  for (int r = 0; r < R; r++)
    for (int64_t j = 0; j < BLOCK; j++) {
      float a = acc[r * BLOCK + j];
      for (int64_t k = k0; k < k1; k++) a += x[r * ldx + k] * w[k * BLOCK + j];
      acc[r * BLOCK + j] = a;
    }
}

template <int R>
__attribute__((target("avx2,fma"))) void f32_avx2(const float* x, int64_t ldx, const float* w, int64_t k0,
                                                   int64_t k1, float* acc) {
  // 16 registers: two vectors of 8 outputs per row at a time, the block's 64 outputs in 4 passes (from L1).
  for (int64_t g = 0; g < BLOCK; g += 16) {
    __m256 a[R][2];
    for (int r = 0; r < R; r++)
      for (int v = 0; v < 2; v++) a[r][v] = _mm256_loadu_ps(acc + r * BLOCK + g + 8 * v);
    for (int64_t k = k0; k < k1; k++) {
      __m256 w0 = _mm256_loadu_ps(w + k * BLOCK + g), w1 = _mm256_loadu_ps(w + k * BLOCK + g + 8);
      for (int r = 0; r < R; r++) {
        __m256 xb = _mm256_set1_ps(x[r * ldx + k]);
        a[r][0] = _mm256_fmadd_ps(xb, w0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(xb, w1, a[r][1]);
      }
    }
    for (int r = 0; r < R; r++)
      for (int v = 0; v < 2; v++) _mm256_storeu_ps(acc + r * BLOCK + g + 8 * v, a[r][v]);
  }
}

template <int R>
__attribute__((target("avx512f,avx512bw,fma"))) void f32_avx512(const float* x, int64_t ldx, const float* w,
                                                                int64_t k0, int64_t k1, float* acc) {
  __m512 a[R][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) a[r][v] = _mm512_loadu_ps(acc + r * BLOCK + 16 * v);
  for (int64_t k = k0; k < k1; k++) {
    const float* wk = w + k * BLOCK;
    if (R == TILE) prefetch_step(wk);
    __m512 wv[4];
    for (int v = 0; v < 4; v++) wv[v] = _mm512_loadu_ps(wk + 16 * v);
    for (int r = 0; r < R; r++) {
      __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_fmadd_ps(xb, wv[v], a[r][v]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc + r * BLOCK + 16 * v, a[r][v]);
}

// ---- bf16 weights, pairs of k per output: w[k/2][j][k%2] ----

template <int R>
void bf16_scalar(const float* x, int64_t ldx, const uint16_t* w, int64_t k0, int64_t k1, float* acc) {
  for (int r = 0; r < R; r++)
    for (int64_t j = 0; j < BLOCK; j++) {
      float a = acc[r * BLOCK + j];
      for (int64_t k = k0; k < k1; k++) a += x[r * ldx + k] * bf16_to_float(w[(k / 2) * 2 * BLOCK + 2 * j + k % 2]);
      acc[r * BLOCK + j] = a;
    }
}

template <int R>
__attribute__((target("avx2,fma"))) void bf16_avx2(const float* x, int64_t ldx, const uint16_t* w, int64_t k0,
                                                    int64_t k1, float* acc) {
  const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
  for (int64_t g = 0; g < BLOCK; g += 16) {
    __m256 a[R][2];
    for (int r = 0; r < R; r++)
      for (int v = 0; v < 2; v++) a[r][v] = _mm256_loadu_ps(acc + r * BLOCK + g + 8 * v);
    for (int64_t k = k0; k < k1; k += 2) {
      const uint16_t* wk = w + k * BLOCK + 2 * g;  // (k/2) * 2 * BLOCK
      for (int v = 0; v < 2; v++) {
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16 * v));
        __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
        for (int r = 0; r < R; r++) {
          a[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * ldx + k]), even, a[r][v]);
          a[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * ldx + k + 1]), odd, a[r][v]);
        }
      }
    }
    for (int r = 0; r < R; r++)
      for (int v = 0; v < 2; v++) _mm256_storeu_ps(acc + r * BLOCK + g + 8 * v, a[r][v]);
  }
}

template <int R>
__attribute__((target("avx512f,avx512bw,fma"))) void bf16_avx512(const float* x, int64_t ldx, const uint16_t* w,
                                                                 int64_t k0, int64_t k1, float* acc) {
  const __m512i high = _mm512_set1_epi32(int32_t(0xffff0000u));
  __m512 a[R][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) a[r][v] = _mm512_loadu_ps(acc + r * BLOCK + 16 * v);
  for (int64_t k = k0; k < k1; k += 2) {
    const uint16_t* wk = w + k * BLOCK;
    if (R == TILE) prefetch_step(wk);
    for (int v = 0; v < 4; v++) {
      __m512i raw = _mm512_loadu_si512(wk + 32 * v);
      __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
      for (int r = 0; r < R; r++) {
        a[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), even, a[r][v]);
        a[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k + 1]), odd, a[r][v]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc + r * BLOCK + 16 * v, a[r][v]);
}

// vdpbf16ps multiplies bf16 by bf16. To keep fp32 activations, each pair of x goes in twice: its bf16
// rounding (hi) and the bf16 of what that rounding left (lo), about 16 bits of x in all; x that is
// bf16 already leaves nothing (LO false: one pass). `xp` holds, per row, K/2 hi pairs then K/2 lo
// pairs, each pair one 32-bit word.
template <int R, bool LO>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void bf16_avx512_dot(const uint32_t* xp, int64_t ldx,
                                                                            const uint16_t* w, int64_t k0,
                                                                            int64_t k1, float* acc) {
  const int64_t half = ldx / 2;
  __m512 a[R][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) a[r][v] = _mm512_loadu_ps(acc + r * BLOCK + 16 * v);
  for (int64_t k = k0; k < k1; k += 2) {
    const uint16_t* wk = w + k * BLOCK;
    if (R == TILE) prefetch_step(wk);
    __m512i wv[4];
    for (int v = 0; v < 4; v++) wv[v] = _mm512_loadu_si512(wk + 32 * v);
    for (int r = 0; r < R; r++) {
      __m512bh hi = (__m512bh)_mm512_set1_epi32(int32_t(xp[r * ldx + k / 2]));
      __m512bh lo = (__m512bh)_mm512_set1_epi32(int32_t(xp[r * ldx + half + k / 2]));
      for (int v = 0; v < 4; v++) {
        a[r][v] = _mm512_dpbf16_ps(a[r][v], hi, (__m512bh)wv[v]);
        if (LO) a[r][v] = _mm512_dpbf16_ps(a[r][v], lo, (__m512bh)wv[v]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc + r * BLOCK + 16 * v, a[r][v]);
}

// ---- int8 weights, quads of k per output: w[k/4][j][k%4]; x already int8. Integer sums are exact, so
// every path gives the same bits in any order. ----

template <int R>
void int8_scalar(const int8_t* x, int64_t ldx, const int8_t* w, int64_t k0, int64_t k1, int32_t* acc) {
  for (int r = 0; r < R; r++)
    for (int64_t j = 0; j < BLOCK; j++) {
      int32_t a = 0;
      for (int64_t k = k0; k < k1; k++) a += int32_t(x[r * ldx + k]) * w[(k / 4) * 4 * BLOCK + 4 * j + k % 4];
      acc[r * BLOCK + j] += a;
    }
}

// Products of int16 pairs (vpmaddwd) leave two partial sums per output, added together at the end.
template <int R>
__attribute__((target("avx2,fma"))) void int8_avx2(const int8_t* x, int64_t ldx, const int8_t* w, int64_t k0,
                                                    int64_t k1, int32_t* acc) {
  for (int64_t g = 0; g < BLOCK; g += 8) {  // 8 outputs = two registers of 4 outputs x 2 partial sums
    __m256i a[R][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 4) {
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * BLOCK + 4 * g));
      __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw));
      __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
      for (int r = 0; r < R; r++) {
        const int8_t* xk = x + r * ldx + k;
        __m256i xq = _mm256_set1_epi64x(int64_t(uint16_t(xk[0])) | int64_t(uint16_t(xk[1])) << 16 |
                                        int64_t(uint16_t(xk[2])) << 32 | int64_t(uint16_t(xk[3])) << 48);
        a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(lo, xq));
        a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(hi, xq));
      }
    }
    for (int r = 0; r < R; r++) {
      int32_t parts[16];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts), a[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts + 8), a[r][1]);
      for (int j = 0; j < 8; j++) acc[r * BLOCK + g + j] += parts[2 * j] + parts[2 * j + 1];
    }
  }
}

template <int R>
__attribute__((target("avx512f,avx512bw"))) void int8_avx512(const int8_t* x, int64_t ldx, const int8_t* w,
                                                             int64_t k0, int64_t k1, int32_t* acc) {
  for (int64_t g = 0; g < BLOCK; g += 32) {  // 32 outputs = four registers of 8 outputs x 2 partial sums
    __m512i a[R][4];
    for (int r = 0; r < R; r++)
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 4) {
      const int8_t* wk = w + k * BLOCK + 4 * g;
      __m512i wide[4];
      for (int v = 0; v < 4; v++)
        wide[v] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32 * v)));
      for (int r = 0; r < R; r++) {
        const int8_t* xk = x + r * ldx + k;
        __m512i xq = _mm512_set1_epi64(int64_t(uint16_t(xk[0])) | int64_t(uint16_t(xk[1])) << 16 |
                                       int64_t(uint16_t(xk[2])) << 32 | int64_t(uint16_t(xk[3])) << 48);
        for (int v = 0; v < 4; v++) a[r][v] = _mm512_add_epi32(a[r][v], _mm512_madd_epi16(wide[v], xq));
      }
    }
    for (int r = 0; r < R; r++) {
      int32_t parts[64];
      for (int v = 0; v < 4; v++) _mm512_storeu_si512(parts + 16 * v, a[r][v]);
      for (int j = 0; j < 32; j++) acc[r * BLOCK + g + j] += parts[2 * j] + parts[2 * j + 1];
    }
  }
}

// vpdpbusd multiplies unsigned by signed bytes: x goes in as x + 128 (`xu`, one quad per 32-bit word),
// and 128 * sum(w) comes off at the end (model/decode_linear.py packs the sums).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_avx512_dot(const uint32_t* xu, int64_t ldx,
                                                                           const int8_t* w, int64_t k0,
                                                                           int64_t k1, int32_t* acc) {
  __m512i a[R][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) a[r][v] = _mm512_loadu_si512(acc + r * BLOCK + 16 * v);
  for (int64_t k = k0; k < k1; k += 4) {
    const int8_t* wk = w + k * BLOCK;
    if (R == TILE) prefetch_step(wk);
    __m512i wv[4];
    for (int v = 0; v < 4; v++) wv[v] = _mm512_loadu_si512(wk + 64 * v);
    for (int r = 0; r < R; r++) {
      __m512i xq = _mm512_set1_epi32(int32_t(xu[r * ldx + k / 4]));
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_dpbusd_epi32(a[r][v], xq, wv[v]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) _mm512_storeu_si512(acc + r * BLOCK + 16 * v, a[r][v]);
}

// ---- the driver: blocks split among threads; per block, k in chunks, rows in tiles ----

// Calls tile.template operator()<R>(first row, k0, k1) for every k chunk of one block, and in each for
// every tile of R rows: a chunk's weights come from memory once, then from L1 for the other tiles.
template <typename Tile>
void over_tiles(int64_t rows, int64_t K, int64_t weight_bytes, const Tile& tile) {
  const int64_t chunk = CHUNK_BYTES / (BLOCK * weight_bytes);
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    int64_t k1 = std::min(K, k0 + chunk);
    int64_t r = 0;
    for (; r + TILE <= rows; r += TILE) tile.template operator()<TILE>(r, k0, k1);
    switch (rows - r) {
      case 3: tile.template operator()<3>(r, k0, k1); break;
      case 2: tile.template operator()<2>(r, k0, k1); break;
      case 1: tile.template operator()<1>(r, k0, k1); break;
      default: break;
    }
  }
}

#define PICK_PATH(path, name, R, ...)                       \
  switch (path) {                                           \
    case AVX512_DOT:                                        \
    case AVX512: name##_avx512<R>(__VA_ARGS__); break;      \
    case AVX2: name##_avx2<R>(__VA_ARGS__); break;          \
    default: name##_scalar<R>(__VA_ARGS__); break;          \
  }

void check_path(int64_t path) {
  TORCH_CHECK(path >= SCALAR && path <= AVX512_DOT, "gpt_kernels: unknown path ", path);
  TORCH_CHECK(path_supported(path), "gpt_kernels: path ", path, " needs instructions this CPU lacks");
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight_sums,
                  int64_t out_features, int64_t path) {
  check_path(path);
  TORCH_CHECK(x.dim() == 2, "gpt_kernels.linear: x must be (rows, in_features)");
  TORCH_CHECK(weight.dim() >= 3 && weight.size(2) == BLOCK && weight.is_contiguous(),
              "gpt_kernels.linear: weight must be packed by model/decode_linear.py");
  const int64_t rows = x.size(0), in = x.size(1), blocks = weight.size(0);
  const auto kind = weight.scalar_type();
  // Packed K: padded with zero weights to whole pairs (bf16) or quads (int8).
  const int64_t K = kind == at::kFloat ? weight.size(1) : weight.size(1) * weight.size(3);
  TORCH_CHECK(in <= K && K - in < 4, "gpt_kernels.linear: x has ", in, " features, the weight ", K);
  TORCH_CHECK(out_features <= blocks * BLOCK, "gpt_kernels.linear: out_features beyond the packed weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "gpt_kernels.linear: x must be float32 or bfloat16, got ", x.scalar_type());
  // Nothing here calls back into torch's dispatcher but the output's allocation: a decode step makes
  // 49 of these calls, and a few small torch ops each cost as much again as a small product.
  auto float_data = [](const std::optional<at::Tensor>& t, const char* name) -> const float* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "gpt_kernels.linear: ", name,
                " must be contiguous float32");
    return t->data_ptr<float>();
  };
  const float* b = float_data(bias, "bias");
  auto y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const bool bf16_out = x.scalar_type() == at::kBFloat16;
  float* out_f = bf16_out ? nullptr : y.data_ptr<float>();
  uint16_t* out_h = bf16_out ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr;
  auto store = [&](int64_t i, float v) {
    if (bf16_out)
      out_h[i] = float_to_bf16(v);  // as torch's .to(bfloat16)
    else
      out_f[i] = v;
  };

  // Activations in fp32, zero-padded to K: x itself where it already is that.
  std::vector<float> padded;
  const float* xs;
  const at::Tensor xc = x.contiguous();
  if (!bf16_out && in == K) {
    xs = xc.data_ptr<float>();
  } else {
    padded.assign(rows * K, 0.0f);
    const uint16_t* x_h = bf16_out ? reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) : nullptr;
    const float* x_f = bf16_out ? nullptr : xc.data_ptr<float>();
    for (int64_t r = 0; r < rows; r++)
      for (int64_t k = 0; k < in; k++) padded[r * K + k] = x_h ? bf16_to_float(x_h[r * in + k]) : x_f[r * in + k];
    xs = padded.data();
  }

  if (kind == at::kFloat || kind == at::kBFloat16) {
    // The same per-call choice for every row: a row's bits still do not depend on the row count.
    const bool exact_bf16 = x.scalar_type() == at::kBFloat16;
    std::vector<uint32_t> pairs;
    if (kind == at::kBFloat16 && path == AVX512_DOT) {
      pairs.resize(rows * K);  // per row: K/2 hi pairs, K/2 lo pairs
      for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < K; k += 2) {
          uint16_t h0 = float_to_bf16(xs[r * K + k]), h1 = float_to_bf16(xs[r * K + k + 1]);
          uint16_t l0 = float_to_bf16(xs[r * K + k] - bf16_to_float(h0));
          uint16_t l1 = float_to_bf16(xs[r * K + k + 1] - bf16_to_float(h1));
          pairs[r * K + k / 2] = uint32_t(h0) | uint32_t(h1) << 16;
          pairs[r * K + K / 2 + k / 2] = uint32_t(l0) | uint32_t(l1) << 16;
        }
    }
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      std::vector<float> acc(rows * BLOCK);
      for (int64_t nb = first; nb < last; nb++) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        over_tiles(rows, K, weight.element_size(), [&]<int R>(int64_t r, int64_t k0, int64_t k1) {
          float* a = acc.data() + r * BLOCK;
          if (kind == at::kFloat) {
            const float* w = weight.data_ptr<float>() + nb * K * BLOCK;
            PICK_PATH(path, f32, R, xs + r * K, K, w, k0, k1, a)
          } else {
            const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()) + nb * K * BLOCK;
            if (path == AVX512_DOT && exact_bf16)
              bf16_avx512_dot<R, false>(pairs.data() + r * K, K, w, k0, k1, a);
            else if (path == AVX512_DOT)
              bf16_avx512_dot<R, true>(pairs.data() + r * K, K, w, k0, k1, a);
            else
              PICK_PATH(path, bf16, R, xs + r * K, K, w, k0, k1, a)
          }
        });
        const int64_t n0 = nb * BLOCK, width = std::min(BLOCK, out_features - n0);
        for (int64_t r = 0; r < rows; r++)
          for (int64_t j = 0; j < width; j++)
            store(r * out_features + n0 + j, b ? acc[r * BLOCK + j] + b[n0 + j] : acc[r * BLOCK + j]);
      }
    });
    return y;
  }

  TORCH_CHECK(kind == at::kChar, "gpt_kernels.linear: weights must be float32, bfloat16 or int8, got ", kind);
  TORCH_CHECK(scale.has_value() && weight_sums.has_value(), "gpt_kernels.linear: int8 weights need their scales");
  const float* ws = float_data(scale, "scale");
  TORCH_CHECK(weight_sums->scalar_type() == at::kInt && weight_sums->is_contiguous(),
              "gpt_kernels.linear: weight_sums must be contiguous int32");
  const int32_t* sums = weight_sums->data_ptr<int32_t>();
  // Each row to int8 with a scale of its own, exactly as model.quantize.Int8Linear does in torch:
  // s = max(amax(|x|), 1e-12) / 127, q = round-half-even(x / s).
  std::vector<float> row_scale(rows);
  std::vector<int8_t> q(rows * K, 0);
  std::vector<uint32_t> quads(path == AVX512_DOT ? rows * K / 4 : 0);
  for (int64_t r = 0; r < rows; r++) {
    float amax = 0.0f;
    for (int64_t k = 0; k < in; k++) amax = std::max(amax, std::fabs(xs[r * K + k]));
    const float s = std::max(amax, 1e-12f) / 127.0f;
    row_scale[r] = s;
    for (int64_t k = 0; k < in; k++) q[r * K + k] = int8_t(std::nearbyint(xs[r * K + k] / s));
    for (size_t i = 0; i < quads.size() / rows; i++) {
      uint32_t word = 0;
      for (int b8 = 0; b8 < 4; b8++) word |= uint32_t(uint8_t(q[r * K + 4 * i + b8] + 128)) << (8 * b8);
      quads[r * K / 4 + i] = word;
    }
  }
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<int32_t> acc(rows * BLOCK);
    for (int64_t nb = first; nb < last; nb++) {
      std::fill(acc.begin(), acc.end(), 0);
      const int8_t* w = weight.data_ptr<int8_t>() + nb * K * BLOCK;
      over_tiles(rows, K, 1, [&]<int R>(int64_t r, int64_t k0, int64_t k1) {
        int32_t* a = acc.data() + r * BLOCK;
        if (path == AVX512_DOT)
          int8_avx512_dot<R>(quads.data() + r * K / 4, K / 4, w, k0, k1, a);
        else
          PICK_PATH(path, int8, R, q.data() + r * K, K, w, k0, k1, a)
      });
      const int64_t n0 = nb * BLOCK, width = std::min(BLOCK, out_features - n0);
      for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < width; j++) {
          int32_t total = acc[r * BLOCK + j] - (path == AVX512_DOT ? 128 * sums[n0 + j] : 0);
          // As Int8Linear: the integer product times (row scale times channel scale), then the bias.
          float v = float(total) * (row_scale[r] * ws[n0 + j]);
          store(r * out_features + n0 + j, b ? v + b[n0 + j] : v);
        }
    }
  });
  return y;
}

// STREAM-style read of `buffer` with the threads and the widest loads `path` has, for the bandwidth
// bound no matrix product here can beat. Returns a sum of everything read, so nothing is skipped.
__attribute__((target("avx512f"))) float read_avx512(const float* p, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; i++) s += p[i];
  return s;
}

__attribute__((target("avx2"))) float read_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = 0.0f;
  for (float l : lanes) s += l;
  for (; i < n; i++) s += p[i];
  return s;
}

float read_scalar(const float* p, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; i++) s += p[i];
  return s;
}

at::Tensor stream_read(const at::Tensor& buffer, int64_t path) {
  check_path(path);
  TORCH_CHECK(buffer.scalar_type() == at::kFloat && buffer.is_contiguous(), "gpt_kernels.stream_read: float32 buffer");
  const float* p = buffer.data_ptr<float>();
  const int64_t n = buffer.numel(), piece = 1 << 16;
  const int64_t pieces = (n + piece - 1) / piece;
  std::vector<float> sums(pieces);
  at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; i++) {
      int64_t len = std::min(piece, n - i * piece);
      sums[i] = path >= AVX512 ? read_avx512(p + i * piece, len)
                : path == AVX2 ? read_avx2(p + i * piece, len)
                               : read_scalar(p + i * piece, len);
    }
  });
  float total = 0.0f;
  for (float s : sums) total += s;
  return at::scalar_tensor(total, buffer.options());
}

}  // namespace

TORCH_LIBRARY(gpt_kernels, m) {
  m.def("path_supported(int path) -> bool", [](int64_t path) { return path_supported(path); });
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? weight_sums, int out_features, int path) -> Tensor");
  m.def("stream_read(Tensor buffer, int path) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_kernels, CPU, m) {
  m.impl("linear", &linear);
  m.impl("stream_read", &stream_read);
}
