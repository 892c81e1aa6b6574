// The data transforms of Winograd F(2x2, 3x3) (ldm/kernels/winograd.py) for channels-last tensors,
// fp32 or bf16, on CPUs with AVX512: one pass over memory each, instead of torch's pad, gather copy
// and a 16 x 16 matrix product over the gathered blocks (8-24 GFLOP/s inside an SD v1 UNet step,
// torch's profiler). Both compute in fp32 and round once.
//
//   winograd_input(x (B, H, W, C), th, tw) -> v (16, B*th*tw, C)
//     v[4a+b][tile] = sum_ij BT[a][i] BT[b][j] d[i][j], d the 4x4 block of x at rows 2ty-1.., columns
//     2tx-1.. (zero outside x: the convolution's padding of 1); th x tw tiles per image.
//   winograd_output(m (16, B*th*tw, O), bias (O) or None, B, H, W) -> y (B, H, W, O)
//     y at (2ty+p, 2tx+q) = sum_ab AT[p][a] AT[q][b] m[4a+b][tile] + bias, cropped to H x W.
//
// BT = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], AT = [[1,1,1,0],[0,1,-1,-1]].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>
#include <optional>

namespace {

// 16 channels of a float or bf16 row as fp32 lanes (masked at the row's end), and back
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(at::BFloat16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// Stores that bypass the caches (v is 4x the input and read back only by the next matrix product,
// after much else has been written): full, aligned vectors only
inline void stream16(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream16(at::BFloat16* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

template <typename T>
inline void put16(T* p, __mmask16 m, __m512 v, bool stream) {
  if (stream) stream16(p, v); else store16(p, m, v);
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

template <typename T>
void input_transform(const T* x, int64_t batch, int64_t h, int64_t w, int64_t c, int64_t th, int64_t tw, T* v) {
  const int64_t tiles = batch * th * tw, plane = tiles * c;
  const bool stream = c % 16 == 0 && reinterpret_cast<uintptr_t>(v) % 64 == 0;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / (th * tw), ty = tile / tw % th, tx = tile % tw;
      const T* rows[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t y = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
          rows[i][j] = (y >= 0 && y < h && xx >= 0 && xx < w) ? x + ((b * h + y) * w + xx) * c : nullptr;
        }
      T* out = v + tile * c;
      for (int64_t c0 = 0; c0 < c; c0 += 16) {
        const __mmask16 m = lanes(c - c0);
        __m512 d[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) d[i][j] = rows[i][j] ? load16(rows[i][j] + c0, m) : _mm512_setzero_ps();
        __m512 t[4][4];  // BT d, along the rows
        for (int j = 0; j < 4; ++j) {
          t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
          t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
          t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
          t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
        }
        for (int a = 0; a < 4; ++a) {  // (BT d) B, along the columns
          put16(out + (4 * a + 0) * plane + c0, m, _mm512_sub_ps(t[a][0], t[a][2]), stream);
          put16(out + (4 * a + 1) * plane + c0, m, _mm512_add_ps(t[a][1], t[a][2]), stream);
          put16(out + (4 * a + 2) * plane + c0, m, _mm512_sub_ps(t[a][2], t[a][1]), stream);
          put16(out + (4 * a + 3) * plane + c0, m, _mm512_sub_ps(t[a][1], t[a][3]), stream);
        }
      }
    }
    if (stream) _mm_sfence();  // this thread's streamed stores are visible before the product reads v
  });
}

template <typename T>
void output_transform(const T* mt, const T* bias, int64_t batch, int64_t h, int64_t w, int64_t o, int64_t th,
                      int64_t tw, T* y) {
  const int64_t tiles = batch * th * tw, plane = tiles * o;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / (th * tw), ty = tile / tw % th, tx = tile % tw;
      const T* in = mt + tile * o;
      for (int64_t c0 = 0; c0 < o; c0 += 16) {
        const __mmask16 m = lanes(o - c0);
        __m512 u[2][4];  // AT m, along the rows
        for (int col = 0; col < 4; ++col) {
          const __m512 m0 = load16(in + (0 + col) * plane + c0, m), m1 = load16(in + (4 + col) * plane + c0, m);
          const __m512 m2 = load16(in + (8 + col) * plane + c0, m), m3 = load16(in + (12 + col) * plane + c0, m);
          u[0][col] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
          u[1][col] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
        }
        const __m512 bv = bias ? load16(bias + c0, m) : _mm512_setzero_ps();
        for (int p = 0; p < 2; ++p) {
          const int64_t row = 2 * ty + p;
          if (row >= h) break;
          T* dst = y + ((b * h + row) * w + 2 * tx) * o + c0;
          store16(dst, m, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(u[p][0], u[p][1]), u[p][2]), bv));
          if (2 * tx + 1 < w)
            store16(dst + o, m, _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(u[p][1], u[p][2]), u[p][3]), bv));
        }
      }
    }
  });
}

void check_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              name, ": CPU float32 or bfloat16 tensors only, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor winograd_input(const at::Tensor& x, int64_t th, int64_t tw) {
  check_dtype(x, "winograd_input");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "winograd_input: x must be a contiguous (B, H, W, C) tensor");
  const int64_t batch = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  TORCH_CHECK(th >= (h + 1) / 2 && tw >= (w + 1) / 2, "winograd_input: too few tiles for the image");
  at::Tensor v = at::empty({16, batch * th * tw, c}, x.options());
  if (x.scalar_type() == at::kFloat)
    input_transform(x.data_ptr<float>(), batch, h, w, c, th, tw, v.data_ptr<float>());
  else
    input_transform(x.data_ptr<at::BFloat16>(), batch, h, w, c, th, tw, v.data_ptr<at::BFloat16>());
  return v;
}

at::Tensor winograd_output(const at::Tensor& m, const std::optional<at::Tensor>& bias, int64_t batch, int64_t h,
                           int64_t w) {
  check_dtype(m, "winograd_output");
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2;
  TORCH_CHECK(m.dim() == 3 && m.size(0) == 16 && m.size(1) == batch * th * tw && m.is_contiguous(),
              "winograd_output: m must be a contiguous (16, B*th*tw, O) tensor for the image size");
  const int64_t o = m.size(2);
  at::Tensor b;
  if (bias) {
    b = bias->to(m.scalar_type()).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == o, "winograd_output: bias must have O values");
  }
  at::Tensor y = at::empty({batch, h, w, o}, m.options());
  if (m.scalar_type() == at::kFloat)
    output_transform(m.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, batch, h, w, o, th, tw,
                     y.data_ptr<float>());
  else
    output_transform(m.data_ptr<at::BFloat16>(), b.defined() ? b.data_ptr<at::BFloat16>() : nullptr, batch, h, w, o,
                     th, tw, y.data_ptr<at::BFloat16>());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ldm, m) {
  m.def("winograd_input(Tensor x, int th, int tw) -> Tensor");
  m.def("winograd_output(Tensor m, Tensor? bias, int batch, int h, int w) -> Tensor");
}

TORCH_LIBRARY_IMPL(ldm, CPU, m) {
  m.impl("winograd_input", &winograd_input);
  m.impl("winograd_output", &winograd_output);
}
