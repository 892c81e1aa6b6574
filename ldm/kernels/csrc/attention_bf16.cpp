// Attention for bf16 tensors on CPUs with AVX512-BF16: softmax(q k^T * scale) v, one pass over the
// keys per block of queries (the online softmax of FlashAttention), fp32 accumulation.
//
// Why: in the SD v1 UNet's 4096-token self-attention (head width 40), torch's CPU kernel spends as
// much time on its exponentials as on its matrix products. Here both products are AVX512-BF16 dot
// products over register tiles, and the exponential is a short polynomial (2^x = 2^n * p(f)).
//
// Layout per (batch, head):
//   kp  (keys_pad/64, d/2, 64, 2)  tiles of 64 keys, each in pairs of feature values: one 64-byte load
//                                  is 16 keys x 2 features, and a tile's loads are consecutive
//   vp  (keys_pad/2, d_pad, 2)     values in pairs of keys: one load is 16 features x 2 keys (d_pad: d
//                                  rounded up to 8; a last 8 features go through 256-bit instructions,
//                                  so head width 40 is 2.5 vectors, not 3)
// A block of queries computes s = q k^T for a block of keys into fp32 (rows x keys), turns it into
// bf16 probabilities p with the running row maximum, rescales its fp32 output rows and adds p v.
// Registered as torch.ops.ldm.attention_bf16(q, k, v, scale) for (B, H, N, d) tensors whose last
// dimension is contiguous; the output is (B, H, N, d) over (B, N, H, d) memory, so the usual
// transpose back to (B, N, H*d) is a view.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using bf16 = uint16_t;

constexpr int64_t kQueryBlock = 48;  // divisible by every row count a register tile uses (1, 2, 3, 4, 6, 8)
constexpr int64_t kKeyBlock = 256;   // s (48 x 256 fp32) and p stay in the first two cache levels

inline bf16 to_bf16(float x) {  // round to nearest even, as the hardware conversion does
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh>(x); }

inline __m512i broadcast_pair(const bf16* p) {  // two adjacent bf16 values into every 32-bit lane
  int32_t pair;
  std::memcpy(&pair, p, 4);
  return _mm512_set1_epi32(pair);
}

// 2^x for x <= 0 (the softmax's shifted scores): n = round(x), f = x - n in [-0.5, 0.5], a degree-3
// polynomial for 2^f fitted for relative error (at most 7.6e-5, against the 2e-3 of the bf16 the
// probabilities are rounded to; the same values make the fp32 row sums, so the normalisation sees the
// same error), and scalef multiplies by 2^n. x is first clamped at -150, where 2^x is 0 in fp32, so
// -inf (padding) gives 0 rather than NaN.
inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(5.5182290722e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4261209909e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9325903928e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9992795417e-1f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 lanes(int64_t count) {  // the first `count` of 16 lanes (none for count <= 0)
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// s[r][j] = sum_k q[r][k] kp[k][j] for ROWS query rows and one tile of 64 keys (4 vectors of 16), and
// each row's running maximum over the tile's first `valid` keys, kept lane-wise in rowmax[r][16].
template <int ROWS>
inline void scores_tile(const bf16* q, int64_t q_stride, const bf16* kp, int64_t pairs, float* s, int64_t s_stride,
                        float* rowmax, int64_t valid) {
  __m512 acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < pairs; ++k) {
    const bf16* row = kp + k * 128;
    __m512i kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = _mm512_loadu_si512(row + c * 32);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh qb = as_bh(broadcast_pair(q + r * q_stride + 2 * k));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, as_bh(kv[c]));
    }
  }
  __mmask16 keys[4];
  for (int c = 0; c < 4; ++c) keys[c] = lanes(valid - 16 * c);
  for (int r = 0; r < ROWS; ++r) {
    __m512 top = _mm512_loadu_ps(rowmax + 16 * r);
    for (int c = 0; c < 4; ++c) {
      _mm512_storeu_ps(s + r * s_stride + c * 16, acc[r][c]);
      top = _mm512_mask_max_ps(top, keys[c], top, acc[r][c]);
    }
    _mm512_storeu_ps(rowmax + 16 * r, top);
  }
}

// o[r][:] += sum_j p[r][j] vp[j][:] for ROWS rows, VECS vectors of 16 output features and, with HALF,
// 8 more, over `pairs` key pairs.
template <int ROWS, int VECS, bool HALF>
inline void values_tile(const bf16* p, int64_t p_stride, const bf16* vp, int64_t d_pad, int64_t pairs,
                        float* o, int64_t o_stride) {
  __m512 acc[ROWS][VECS > 0 ? VECS : 1];
  __m256 tail[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_loadu_ps(o + r * o_stride + c * 16);
    if (HALF) tail[r] = _mm256_loadu_ps(o + r * o_stride + VECS * 16);
  }
  for (int64_t j = 0; j < pairs; ++j) {
    const bf16* row = vp + j * d_pad * 2;
    __m512i vv[VECS > 0 ? VECS : 1];
    for (int c = 0; c < VECS; ++c) vv[c] = _mm512_loadu_si512(row + c * 32);
    const __m256i vt = HALF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + VECS * 32)) : _mm256_setzero_si256();
    for (int r = 0; r < ROWS; ++r) {
      const __m512i pair = broadcast_pair(p + r * p_stride + 2 * j);
      for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(pair), as_bh(vv[c]));
      if (HALF)
        tail[r] = _mm256_dpbf16_ps(tail[r], reinterpret_cast<__m256bh>(_mm512_castsi512_si256(pair)),
                                   reinterpret_cast<__m256bh>(vt));
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < VECS; ++c) _mm512_storeu_ps(o + r * o_stride + c * 16, acc[r][c]);
    if (HALF) _mm256_storeu_ps(o + r * o_stride + VECS * 16, tail[r]);
  }
}

using ValuesTile = void (*)(const bf16*, int64_t, const bf16*, int64_t, int64_t, float*, int64_t);

struct ValuesKernel {
  ValuesTile tile;  // the widest tile: `rows` rows at once
  ValuesTile one;   // a single row, for the rows left over
  int rows;
};

template <int VECS, bool HALF>
ValuesKernel values_kernel() {
  constexpr int rows = std::max(1, std::min(8, 24 / (VECS + HALF)));  // about 24 accumulators of 32 registers
  return {values_tile<rows, VECS, HALF>, values_tile<1, VECS, HALF>, rows};
}

template <bool HALF>
ValuesKernel values_kernel_for(int64_t vecs) {  // 0 (with HALF) to 8 vectors
  switch (vecs) {
    case 0: return values_kernel<0, true>();
    case 1: return values_kernel<1, HALF>();
    case 2: return values_kernel<2, HALF>();
    case 3: return values_kernel<3, HALF>();
    case 4: return values_kernel<4, HALF>();
    case 5: return values_kernel<5, HALF>();
    case 6: return values_kernel<6, HALF>();
    case 7: return values_kernel<7, HALF>();
    default: return values_kernel<8, HALF>();
  }
}

// The output features in column groups of at most 8 vectors (128 features), as even as possible, the
// last group taking a final half vector: 40 features are one group of 2.5 vectors, 160 two of 5, 512
// four of 8, 8 one half vector.
struct ValuesPlan {
  ValuesKernel wide, narrow, last;  // the first `wide_groups` groups are one vector wider than the rest
  int64_t groups, wide_groups, narrow_vecs;
};

ValuesPlan values_plan(int64_t vecs, bool half) {
  const int64_t groups = std::max<int64_t>(1, (vecs + 7) / 8), narrow = vecs / groups, wide_groups = vecs % groups;
  const int64_t last_vecs = narrow + (groups - 1 < wide_groups ? 1 : 0);
  return {values_kernel_for<false>(narrow + 1), values_kernel_for<false>(narrow),
          half ? values_kernel_for<true>(last_vecs) : values_kernel_for<false>(last_vecs), groups, wide_groups, narrow};
}

struct Shapes {
  int64_t batch, heads, queries, keys, dim;
  int64_t pairs, keys_pad, d_pad, vecs;
};

// Keys and values of one (batch, head) into the paired layouts above, zero-padded.
void pack_head(const bf16* k, int64_t k_stride, const bf16* v, int64_t v_stride, const Shapes& s,
               bf16* kp, bf16* vp) {
  std::memset(kp, 0, s.pairs * s.keys_pad * 2 * sizeof(bf16));
  std::memset(vp, 0, s.keys_pad * s.d_pad * sizeof(bf16));
  for (int64_t j = 0; j < s.keys; ++j) {
    const bf16* krow = k + j * k_stride;
    const bf16* vrow = v + j * v_stride;
    for (int64_t k2 = 0; k2 < s.pairs; ++k2) {
      bf16* kdst = kp + ((j / 64) * s.pairs + k2) * 128 + (j % 64) * 2;
      kdst[0] = krow[2 * k2];
      kdst[1] = krow[2 * k2 + 1];
    }
    bf16* vdst = vp + (j / 2) * s.d_pad * 2 + (j % 2);
    for (int64_t d = 0; d < s.dim; ++d) vdst[2 * d] = vrow[d];
  }
}

struct Scratch {
  std::vector<float> s, o, m, l, rowmax;
  std::vector<bf16> p;
  explicit Scratch(const Shapes& sh)
      : s(kQueryBlock * kKeyBlock), o(kQueryBlock * sh.d_pad), m(kQueryBlock), l(kQueryBlock),
        rowmax(kQueryBlock * 16), p(kQueryBlock * kKeyBlock) {}
};

// Softmax step for `rows` rows over `cols` scores (cols a multiple of 32; columns >= valid are padding)
// whose lane-wise maxima are in w.rowmax: updates the running maxima m (in log2 units) and sums l,
// rescales o, writes bf16 probabilities p.
void softmax_block(Scratch& w, int64_t rows, int64_t cols, int64_t valid, float log2_scale, int64_t d_pad) {
  const __m512 c = _mm512_set1_ps(log2_scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = w.s.data() + r * kKeyBlock;
    for (int64_t j = valid; j < cols; ++j) srow[j] = -std::numeric_limits<float>::infinity();
    const float m_new = std::max(w.m[r], _mm512_reduce_max_ps(_mm512_loadu_ps(w.rowmax.data() + 16 * r)) * log2_scale);
    const __m512 shift = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    bf16* prow = w.p.data() + r * kKeyBlock;
    for (int64_t j = 0; j < cols; j += 32) {
      const __m512 e0 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(srow + j), c, shift));
      const __m512 e1 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(srow + j + 16), c, shift));
      vsum = _mm512_add_ps(vsum, _mm512_add_ps(e0, e1));
      _mm512_storeu_si512(prow + j, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
    }
    const float alpha = std::exp2(w.m[r] - m_new);  // 0 on the first block (m = -inf)
    w.l[r] = w.l[r] * alpha + _mm512_reduce_add_ps(vsum);
    w.m[r] = m_new;
    if (alpha != 1.0f) {
      float* orow = w.o.data() + r * d_pad;
      const __m512 a = _mm512_set1_ps(alpha);
      for (int64_t d = 0; d < d_pad; d += 16) {
        const __mmask16 m = lanes(d_pad - d);
        _mm512_mask_storeu_ps(orow + d, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, orow + d)));
      }
    }
  }
}

// One block of `rows` queries of one head against all keys.
void attend_block(const bf16* q, int64_t q_stride, const bf16* kp, const bf16* vp, const Shapes& sh,
                  const ValuesPlan& plan, int64_t rows, float log2_scale, Scratch& w, bf16* out, int64_t out_stride) {
  std::fill(w.o.begin(), w.o.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  for (int64_t j0 = 0; j0 < sh.keys; j0 += kKeyBlock) {
    const int64_t valid = std::min(kKeyBlock, sh.keys - j0);
    const int64_t cols = (valid + 63) / 64 * 64;  // score tiles are 64 keys wide (keys_pad covers it)
    std::fill(w.rowmax.begin(), w.rowmax.end(), -std::numeric_limits<float>::infinity());
    for (int64_t jt = 0; jt < cols; jt += 64) {
      const bf16* tile = kp + (j0 + jt) * sh.pairs * 2;  // tile (j0 + jt) / 64 of pairs x 64 x 2
      float* s = w.s.data() + jt;
      int64_t r = 0;
      for (; r + 6 <= rows; r += 6)
        scores_tile<6>(q + r * q_stride, q_stride, tile, sh.pairs, s + r * kKeyBlock, kKeyBlock, w.rowmax.data() + 16 * r,
                       valid - jt);
      for (; r < rows; ++r)
        scores_tile<1>(q + r * q_stride, q_stride, tile, sh.pairs, s + r * kKeyBlock, kKeyBlock, w.rowmax.data() + 16 * r,
                       valid - jt);
    }
    softmax_block(w, rows, cols, valid, log2_scale, sh.d_pad);
    const bf16* vblock = vp + j0 * sh.d_pad;  // (j0 / 2) pairs of d_pad x 2
    const int64_t pairs = cols / 2;
    int64_t v0 = 0;  // first vector of the group
    for (int64_t g = 0; g < plan.groups; ++g) {
      const ValuesKernel& vk = g == plan.groups - 1 ? plan.last : g < plan.wide_groups ? plan.wide : plan.narrow;
      int64_t r = 0;
      for (; r + vk.rows <= rows; r += vk.rows)
        vk.tile(w.p.data() + r * kKeyBlock, kKeyBlock, vblock + v0 * 32, sh.d_pad, pairs, w.o.data() + r * sh.d_pad + v0 * 16, sh.d_pad);
      for (; r < rows; ++r)
        vk.one(w.p.data() + r * kKeyBlock, kKeyBlock, vblock + v0 * 32, sh.d_pad, pairs, w.o.data() + r * sh.d_pad + v0 * 16, sh.d_pad);
      v0 += plan.narrow_vecs + (g < plan.wide_groups ? 1 : 0);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / w.l[r];
    const float* orow = w.o.data() + r * sh.d_pad;
    bf16* dst = out + r * out_stride;
    for (int64_t d = 0; d < sh.dim; ++d) dst[d] = to_bf16(orow[d] * inv);
  }
}

at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_bf16: q, k, v must be (batch, heads, tokens, dim)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attention_bf16: q, k, v must be bfloat16");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention_bf16: CPU tensors only");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention_bf16: the last dimension must be contiguous");
  Shapes sh{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 0, 0, 0, 0};
  TORCH_CHECK(k.size(0) == sh.batch && v.size(0) == sh.batch && k.size(1) == sh.heads && v.size(1) == sh.heads,
              "attention_bf16: q, k, v must share batch and heads");
  TORCH_CHECK(k.size(3) == sh.dim && v.size(3) == sh.dim && v.size(2) == sh.keys, "attention_bf16: k and v must match q's dim and each other's tokens");
  TORCH_CHECK(sh.dim % 2 == 0 && sh.keys > 0, "attention_bf16: dim must be even, with at least one key");
  TORCH_CHECK(scale > 0, "attention_bf16: scale must be positive (the running maxima are taken before scaling)");
  sh.pairs = sh.dim / 2;
  sh.keys_pad = (sh.keys + 63) / 64 * 64;
  sh.d_pad = (sh.dim + 7) / 8 * 8;
  sh.vecs = sh.d_pad / 16;  // whole vectors; d_pad % 16 == 8 adds a half one
  const int64_t heads = sh.batch * sh.heads;

  std::vector<bf16> kp(heads * sh.pairs * sh.keys_pad * 2), vp(heads * sh.keys_pad * sh.d_pad);
  const auto* kdata = reinterpret_cast<const bf16*>(k.data_ptr<at::BFloat16>());
  const auto* vdata = reinterpret_cast<const bf16*>(v.data_ptr<at::BFloat16>());
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / sh.heads, h = bh % sh.heads;
      pack_head(kdata + b * k.stride(0) + h * k.stride(1), k.stride(2), vdata + b * v.stride(0) + h * v.stride(1), v.stride(2),
                sh, kp.data() + bh * sh.pairs * sh.keys_pad * 2, vp.data() + bh * sh.keys_pad * sh.d_pad);
    }
  });

  // (B, N, H, d) memory seen as (B, H, N, d)
  at::Tensor out = at::empty({sh.batch, sh.queries, sh.heads, sh.dim}, q.options()).transpose(1, 2);
  const auto* qdata = reinterpret_cast<const bf16*>(q.data_ptr<at::BFloat16>());
  auto* odata = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  const ValuesPlan plan = values_plan(sh.vecs, sh.d_pad % 16 == 8);
  const float log2_scale = static_cast<float>(scale * M_LOG2E);
  const int64_t blocks = (sh.queries + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch w(sh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, i0 = (task % blocks) * kQueryBlock;
      const int64_t b = bh / sh.heads, h = bh % sh.heads;
      const int64_t rows = std::min(kQueryBlock, sh.queries - i0);
      attend_block(qdata + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2), q.stride(2),
                   kp.data() + bh * sh.pairs * sh.keys_pad * 2, vp.data() + bh * sh.keys_pad * sh.d_pad, sh, plan, rows,
                   log2_scale, w, odata + b * out.stride(0) + h * out.stride(1) + i0 * out.stride(2), out.stride(2));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ldm, m) {
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ldm, CPU, m) {
  m.impl("attention_bf16", &attention_bf16);
}
