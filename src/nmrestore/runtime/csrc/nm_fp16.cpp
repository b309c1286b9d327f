// fp16 N:M-sparse Conv2d: the direct sparse convolution of nm_kernels.cpp with fp16 activations,
// weights and accumulators (AVX512-FP16 `vfmadd231ph`), bias, residual and ReLU in f32. Compiled in
// only when the compiler targets AVX512-FP16 (-march=native on such a CPU); otherwise nmk_has_f16()
// is 0 and precision "fp16" runs the other kernels.
//
// Why fp16 beside bf16, measured on a Xeon with AVX512-FP16 (one 64->64 3x3 conv on 320x180, 2
// threads, per-channel masks, the same loop in both precisions): `vfmadd231ph` does 32 MACs where an
// f32 FMA does 16, at the same rate, and a 64-byte load brings 32 columns instead of 16, so each kept
// weight costs half the instructions: 2.5x (2:32), 2.7x (4:32), 2.8x (8:32) the f32 loop's speed.
// `vdpbf16ps` gives no such gain (its MACs per cycle equal f32 FMA's). fp16 keeps 11 significant
// bits against bf16's 8; the cost is its range (largest finite value 65504) and rounding in the
// fp16 sums, which is why the engine checks a layer's output against f32 before choosing it.
//
// Layout, hand-off and work items as in nm_bf16.cpp; columns stay in order, so the epilogue
// converts each 32-column accumulator to two f32 vectors and needs no permute.
#include "nm_common.h"

#if defined(__AVX512FP16__) && defined(__AVX512BW__) && defined(__AVX512F__) && !defined(NMK_NO_F16)
#define NMK_F16 1
#include <immintrin.h>
#else
#define NMK_F16 0
#endif

namespace {

using namespace nmk;

#ifndef NMK_HTR  // tile shape (overridable for experiments)
#define NMK_HTR 2
#define NMK_HNV 2
#endif
constexpr int HV = 32;         // fp16 columns per 512-bit vector
constexpr int HTR = NMK_HTR;   // output rows per tile
constexpr int HNV = NMK_HNV;   // vectors per tile row
constexpr int HTW = HV * HNV;  // output columns per tile

Geometry geometry_f16(const int64_t* prm) {
  return geometry(prm[P_B], prm[P_C], prm[P_H], prm[P_W], prm[P_KH], prm[P_KW], prm[P_SH], prm[P_SW], prm[P_PH],
                  prm[P_PW], prm[P_DH], prm[P_DW], HV, HTR);
}

// Slack after the last image: a tile's last vector may read up to HTW + Wq elements past a row.
inline int64_t slack_f16(const Geometry& g) { return HTW + g.Wq + 2 * HV; }

#if NMK_F16

// One kept weight of one output channel: its workspace offset and its fp16 bits.
struct Entry {
  int32_t off;
  uint32_t w;  // fp16 bits in the low half
};

// Where a tile's results go: an f32 and/or an fp16 image (row strides in elements), with an
// optional f32 residual read through its own row stride.
struct Sink {
  float* f32;
  int64_t fstride;
  uint16_t* h16;
  int64_t hstride;
  const void* res;  // f32, or fp16 when res16
  int64_t rstride;
  bool res16;
  bool stream;  // whole aligned vectors bypass the caches (an output larger than they are)
};

// Stores bypassing the caches when asked and the address is aligned, else ordinary ones.
inline void put16(float* p, __mmask16 m, __m512 v, bool stream) {
  if (stream && m == 0xffff && (reinterpret_cast<uintptr_t>(p) & 63) == 0)
    _mm512_stream_ps(p, v);
  else
    _mm512_mask_storeu_ps(p, m, v);
}
inline void put16h(uint16_t* p, __mmask16 m, __m256i v, bool stream) {
  if (stream && m == 0xffff && (reinterpret_cast<uintptr_t>(p) & 31) == 0)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  else
    _mm256_mask_storeu_epi16(p, m, v);
}
inline void put32h(uint16_t* p, __m512h v, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), _mm512_castph_si512(v));
  else
    _mm512_storeu_ph(p, v);
}

// One output channel of one tile: its kept weights `en` (or one block's of them, see Item), from
// `init` (a block's partial sums) or the bias; into `keep` (partial sums for the next block) or
// through the epilogue into `s`.
template <bool RELU, bool RES, int NVX>
inline void tile(const uint16_t* __restrict xh, const Entry* __restrict en, int64_t n, int64_t xstride, float bias,
                 const Sink& s, float res_scale, int nrows, int ncols, const __m512h* init = nullptr,
                 __m512h* keep = nullptr) {
  // Without a residual the sums start from the bias (one rounding less work in the epilogue).
  const __m512h b0 = RES ? _mm512_setzero_ph() : _mm512_set1_ph((_Float16)bias);
  // Two sets of sums, even and odd kept weights: a 2x64 tile is only four vectors, and one chain
  // of dependent FMAs per vector would wait on the FMA latency (4 cycles) at every weight.
  __m512h acc[HTR][NVX], odd[HTR][NVX];
#pragma GCC unroll 8
  for (int r = 0; r < HTR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NVX; ++v) acc[r][v] = init ? init[r * NVX + v] : b0, odd[r][v] = _mm512_setzero_ph();
  int64_t k = 0;
  for (; k + 1 < n; k += 2) {
    const uint16_t* p = xh + en[k].off;
    const uint16_t* q = xh + en[k + 1].off;
    const __m512h w = _mm512_castsi512_ph(_mm512_set1_epi16((short)en[k].w));
    const __m512h u = _mm512_castsi512_ph(_mm512_set1_epi16((short)en[k + 1].w));
#pragma GCC unroll 8
    for (int r = 0; r < HTR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NVX; ++v) {
        acc[r][v] = _mm512_fmadd_ph(w, _mm512_loadu_ph(p + r * xstride + v * HV), acc[r][v]);
        odd[r][v] = _mm512_fmadd_ph(u, _mm512_loadu_ph(q + r * xstride + v * HV), odd[r][v]);
      }
  }
  if (k < n) {
    const uint16_t* p = xh + en[k].off;
    const __m512h w = _mm512_castsi512_ph(_mm512_set1_epi16((short)en[k].w));
#pragma GCC unroll 8
    for (int r = 0; r < HTR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NVX; ++v) acc[r][v] = _mm512_fmadd_ph(w, _mm512_loadu_ph(p + r * xstride + v * HV), acc[r][v]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < HTR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NVX; ++v) acc[r][v] = _mm512_add_ph(acc[r][v], odd[r][v]);
  if (keep) {
#pragma GCC unroll 8
    for (int r = 0; r < HTR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NVX; ++v) keep[r * NVX + v] = acc[r][v];
    return;
  }
  if (!RES && s.f32 == nullptr) {  // an fp16 hand-off only (inside a fused block): no f32 pass
    const __m512h zero = _mm512_setzero_ph();
    if (nrows == HTR && ncols == NVX * HV) {
#pragma GCC unroll 8
      for (int r = 0; r < HTR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NVX; ++v)
          put32h(s.h16 + r * s.hstride + v * HV, RELU ? _mm512_max_ph(acc[r][v], zero) : acc[r][v], s.stream);
      return;
    }
    for (int r = 0; r < nrows; ++r)
      for (int v = 0; v < NVX && v * HV < ncols; ++v) {
        const int m = std::min(HV, ncols - v * HV);
        const __mmask32 mk = m == 32 ? 0xffffffffu : (1u << m) - 1;
        _mm512_mask_storeu_epi16(s.h16 + r * s.hstride + v * HV, mk,
                                 _mm512_castph_si512(RELU ? _mm512_max_ph(acc[r][v], zero) : acc[r][v]));
      }
    return;
  }
  const __m512 vb = _mm512_set1_ps(RES ? bias : 0.f), vs = _mm512_set1_ps(res_scale), zero = _mm512_setzero_ps();
  for (int r = 0; r < nrows; ++r)
    for (int v = 0; v < NVX; ++v)
      for (int h = 0; h < 2; ++h) {
        const int c0 = v * HV + h * 16;
        if (c0 >= ncols) break;
        const int m = std::min(16, ncols - c0);
        const __mmask16 mk = (__mmask16)(m == 16 ? 0xffff : (1u << m) - 1);
        const __m256i half = _mm512_extracti64x4_epi64(_mm512_castph_si512(acc[r][v]), 1);
        const __m256i lowh = _mm512_castsi512_si256(_mm512_castph_si512(acc[r][v]));
        __m512 y = _mm512_cvtph_ps(h ? half : lowh);
        if (RES) {
          const int64_t at = r * s.rstride + c0;
          const __m512 rv = s.res16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(s.res) + at))
                                    : _mm512_maskz_loadu_ps(mk, static_cast<const float*>(s.res) + at);
          y = _mm512_fmadd_ps(_mm512_add_ps(y, vb), vs, rv);
        }
        if (RELU) y = _mm512_max_ps(y, zero);
        if (s.f32) put16(s.f32 + r * s.fstride + c0, mk, y, s.stream);
        if (s.h16) put16h(s.h16 + r * s.hstride + c0, mk, _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT), s.stream);
      }
}

// How many output channels ahead a tile prefetches its residual (each tile reads 2 rows x 64
// columns of it, scattered over the channels, which the hardware prefetcher does not follow).
constexpr int RES_AHEAD = 4;

// Input channels per block of a split layer (see Item).
constexpr int64_t SPLIT_CHANNELS = 32;
// Output channels whose partial sums a split tile keeps aside at a time (16 KB at 2x64).
constexpr int64_t SPLIT_OUTPUTS = 64;
// Densest layer that is split (a denser one finds its window in L1 often enough).
#ifndef NMK_HSPLIT
#define NMK_HSPLIT 0.3
#endif
constexpr double SPLIT_MAX_DENSITY = NMK_HSPLIT;

struct Item {
  const uint16_t* xrow;
  const Entry* entries;
  // entries of output channel o in input block g: rp[g * (O + 1) + o] .. rp[g * (O + 1) + o + 1] - 1.
  // With several blocks (split), a tile runs all its output channels over one block of input
  // channels before the next, their partial sums kept aside: each sweep then reads a 17 KB window
  // of the input (4 rows x 32 channels x 66 columns) instead of 34 KB, which L1 keeps beside
  // everything else. The scattered positions that 64 output channels read in a 34 KB window cost
  // about a third of the time (the same conv runs 1.4-1.5x faster when every channel keeps the
  // same positions).
  const int64_t* rp;
  int64_t blocks;
  const float* bias;
  int64_t O, xstride, Wo, y0;
  int nrows;
  int64_t ct0, ct1;
  bool res16;  // the residual holds fp16 (else f32)
  bool stream;
};

// Every tile of one work item, output channel innermost (the input rows stay in L1 meanwhile).
template <bool RELU, bool RES, int NVX>
void item(const Item& it, float* out_b, Strides os, uint16_t* out2_b, Strides o2s, const char* res_b, Strides rs,
          float res_scale) {
  const int64_t rsize = it.res16 ? 2 : 4;  // bytes per residual element
  constexpr int TWX = NVX * HV;
  for (int64_t ct = it.ct0; ct < it.ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, it.Wo - x0);
    for (int64_t o = 0; o < it.O; ++o) {
      const int64_t k0 = it.rp[o];
      if (RES && o + RES_AHEAD < it.O) {  // the residual of a channel a few tiles on, from memory
        const char* ra = res_b + ((o + RES_AHEAD) * rs.c + it.y0 * rs.h + x0) * rsize;
        for (int r = 0; r < it.nrows; ++r)
          for (int64_t l = 0; l < ncols * rsize; l += 64) __builtin_prefetch(ra + r * rs.h * rsize + l, 0, 3);
      }
      const Sink s{out_b ? out_b + o * os.c + it.y0 * os.h + x0 : nullptr, os.h,
                   out2_b ? out2_b + o * o2s.c + it.y0 * o2s.h + x0 : nullptr, o2s.h,
                   RES ? res_b + (o * rs.c + it.y0 * rs.h + x0) * rsize : nullptr, rs.h, it.res16, it.stream};
      tile<RELU, RES, NVX>(it.xrow + x0, it.entries + k0, it.rp[o + 1] - k0, it.xstride,
                           it.bias ? it.bias[o] : 0.f, s, res_scale, it.nrows, ncols);
    }
  }
}

// item() for a layer split by input channels (Item::rp).
template <bool RELU, bool RES, int NVX>
void item_split(const Item& it, float* out_b, Strides os, uint16_t* out2_b, Strides o2s, const char* res_b,
                Strides rs, float res_scale) {
  constexpr int TWX = NVX * HV;
  const int64_t rsize = it.res16 ? 2 : 4;
  alignas(64) __m512h part[SPLIT_OUTPUTS][HTR * NVX];
  for (int64_t ct = it.ct0; ct < it.ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, it.Wo - x0);
    for (int64_t o0 = 0; o0 < it.O; o0 += SPLIT_OUTPUTS) {
      const int64_t oc = std::min<int64_t>(SPLIT_OUTPUTS, it.O - o0);
      for (int64_t g = 0; g < it.blocks; ++g) {
        const int64_t* rp = it.rp + g * (it.O + 1);
        const bool last = g + 1 == it.blocks;
        for (int64_t j = 0; j < oc; ++j) {
          const int64_t o = o0 + j;
          if (RES && last && o + RES_AHEAD < it.O) {
            const char* ra = res_b + ((o + RES_AHEAD) * rs.c + it.y0 * rs.h + x0) * rsize;
            for (int r = 0; r < it.nrows; ++r)
              for (int64_t l = 0; l < ncols * rsize; l += 64) __builtin_prefetch(ra + r * rs.h * rsize + l, 0, 3);
          }
          const Sink s{out_b ? out_b + o * os.c + it.y0 * os.h + x0 : nullptr, os.h,
                       out2_b ? out2_b + o * o2s.c + it.y0 * o2s.h + x0 : nullptr, o2s.h,
                       RES ? res_b + (o * rs.c + it.y0 * rs.h + x0) * rsize : nullptr, rs.h, it.res16, it.stream};
          tile<RELU, RES, NVX>(it.xrow + x0, it.entries + rp[o], rp[o + 1] - rp[o], it.xstride,
                               it.bias ? it.bias[o] : 0.f, s, res_scale, it.nrows, ncols, g ? part[j] : nullptr,
                               last ? nullptr : part[j]);
        }
      }
    }
  }
}

// With a fused pixel shuffle of factor R (see nm_kernels.cpp): the R channels of one (c, i) are
// computed into a small f32 buffer, then interleaved into the high-resolution rows.
template <bool RELU, int NVX>
void item_shuffle(const Item& it, int R, float* out_b, Strides os, uint16_t* out2_b, Strides o2s) {
  constexpr int TWX = NVX * HV;
  alignas(64) float tmp[4][HTR][TWX];  // R <= 4
  for (int64_t ct = it.ct0; ct < it.ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, it.Wo - x0);
    for (int64_t og = 0; og < it.O; og += R) {
      for (int j = 0; j < R; ++j) {
        const int64_t o = og + j, k0 = it.rp[o];
        const Sink s{&tmp[j][0][0], TWX, nullptr, 0, nullptr, 0, false, false};
        tile<RELU, false, NVX>(it.xrow + x0, it.entries + k0, it.rp[o + 1] - k0, it.xstride,
                               it.bias ? it.bias[o] : 0.f, s, 1.f, it.nrows, TWX);
      }
      const int64_t c = og / (R * R), i = (og / R) % R;
      for (int r = 0; r < it.nrows; ++r) {
        const int64_t hr = (it.y0 + r) * R + i;
        float* df = out_b ? out_b + c * os.c + hr * os.h + x0 * R : nullptr;
        uint16_t* dh = out2_b ? out2_b + c * o2s.c + hr * o2s.h + x0 * R : nullptr;
        int l = 0;
        if (R == 2) {  // the common x2 upsampler: interleave 16 + 16 columns with two permutes
          const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
          const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
          for (; l + 16 <= ncols; l += 16) {
            const __m512 a = _mm512_load_ps(&tmp[0][r][l]), b = _mm512_load_ps(&tmp[1][r][l]);
            const __m512 u = _mm512_permutex2var_ps(a, lo, b), w = _mm512_permutex2var_ps(a, hi, b);
            if (df) _mm512_storeu_ps(df + 2 * l, u), _mm512_storeu_ps(df + 2 * l + 16, w);
            if (dh) {
              _mm256_storeu_si256((__m256i*)(dh + 2 * l), _mm512_cvtps_ph(u, _MM_FROUND_TO_NEAREST_INT));
              _mm256_storeu_si256((__m256i*)(dh + 2 * l + 16), _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
            }
          }
        }
        for (; l < ncols; ++l)
          for (int j = 0; j < R; ++j) {
            const float v = tmp[j][r][l];
            if (df) df[l * R + j] = v;
            if (dh) dh[l * R + j] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
          }
      }
    }
  }
}

template <int NVX>
void item_any(const Item& it, bool relu, int R, float* out_b, Strides os, uint16_t* out2_b, Strides o2s,
              const char* res_b, Strides rs, float res_scale) {
  if (R > 1) {
    if (relu)
      item_shuffle<true, NVX>(it, R, out_b, os, out2_b, o2s);
    else
      item_shuffle<false, NVX>(it, R, out_b, os, out2_b, o2s);
    return;
  }
#define NMK_ITEM(A, B)                                                     \
  (it.blocks > 1 ? item_split<A, B, NVX>(it, out_b, os, out2_b, o2s, res_b, rs, res_scale) \
                 : item<A, B, NVX>(it, out_b, os, out2_b, o2s, res_b, rs, res_scale))
  if (relu && res_b) NMK_ITEM(true, true);
  else if (relu) NMK_ITEM(true, false);
  else if (res_b) NMK_ITEM(false, true);
  else NMK_ITEM(false, false);
#undef NMK_ITEM
  if (it.stream) _mm_sfence();  // the streamed stores are visible before the parallel region ends
}

// Blocks of SPLIT_CHANNELS input channels a conv's tiles run one after another (1: unsplit): at low
// density, where the scattered reads of many output channels miss L1; not with a fused shuffle.
int64_t split_blocks(int64_t C, int64_t O, int64_t kept, int64_t taps, int R) {
  if (R > 1 || C < 2 * SPLIT_CHANNELS || C % SPLIT_CHANNELS != 0) return 1;
  const double density = double(kept) / double(std::max<int64_t>(1, O * C * taps));
  return density <= SPLIT_MAX_DENSITY ? C / SPLIT_CHANNELS : 1;
}

// f32 -> fp16 row conversion, 16 at a time (round to nearest even, as torch's .to(float16)).
void f32_row_to_f16(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), _MM_FROUND_TO_NEAREST_INT));
  }
}

#endif  // NMK_F16

}  // namespace

extern "C" {

int nmk_has_f16() { return NMK_F16; }
int nmk_f16_tile_rows() { return HTR; }
int nmk_f16_tile_cols() { return HTW; }

// fp16 elements of workspace nmk_conv2d_f16 needs for an input it pads itself (64-byte aligned).
int64_t nmk_f16_workspace(const int64_t* prm) {
  const Geometry g = geometry_f16(prm);
  return g.B * g.per_b + slack_f16(g) + 64;
}

int64_t nmk_f16_rows_read(int64_t H, int64_t KH, int64_t sh, int64_t ph, int64_t dh) {
  return rows_read(H, KH, sh, ph, dh, HTR);
}

int64_t nmk_f16_tail_slack(int64_t row_elems) { return HTW + row_elems + 2 * HV; }

// The fp16 sparse conv: nmk_conv2d_bf16's parameters and contract (nm_bf16.cpp), with fp16 where
// that one has bf16 (P_IN_BF16 then means "x holds fp16"; values and out2 are fp16), and a residual
// that may hold fp16 (P_RES_F16; strides in its elements).
// Returns 0; -1 on a bad geometry; -2 when the workspace needs offsets beyond 32 bits; -3 when
// this build has no fp16 kernels.
int nmk_conv2d_f16(const int64_t* prm, const void* x, void* workspace, const int32_t* rowptr, const int32_t* cin,
                   const int32_t* kpos, const uint16_t* val, const float* bias, const float* residual,
                   float res_scale, float* out, uint16_t* out2) {
#if !NMK_F16
  (void)prm, (void)x, (void)workspace, (void)rowptr, (void)cin, (void)kpos, (void)val, (void)bias;
  (void)residual, (void)res_scale, (void)out, (void)out2;
  return -3;
#else
  const int64_t B = prm[P_B], C = prm[P_C], O = prm[P_O], sh = prm[P_SH], sw = prm[P_SW];
  const bool padded = prm[P_IN_PADDED] != 0, in_f16 = prm[P_IN_BF16] != 0;
  const int R = prm[P_SHUFFLE] > 1 ? (int)prm[P_SHUFFLE] : 1;
  const int nthreads = prm[P_THREADS] > 0 ? (int)prm[P_THREADS] : 1;
  if (!prm[P_OUT_F32]) out = nullptr;
  Geometry g = geometry_f16(prm);
  if (g.Ho <= 0 || g.Wo <= 0 || sh < 1 || sw < 1 || prm[P_DH] < 1 || prm[P_DW] < 1) return -1;
  if (R > 4 || (R > 1 && (O % (R * R) != 0 || residual != nullptr))) return -1;
  if (out == nullptr && out2 == nullptr) return -1;
  const Strides xs{prm[P_XSB], prm[P_XSC], prm[P_XSH]};
  const Strides rs{prm[P_RSB], prm[P_RSC], prm[P_RSH]};
  const Strides os{prm[P_OSB], prm[P_OSC], prm[P_OSH]};
  const Strides o2s{prm[P_O2SB], prm[P_O2SC], prm[P_O2SH]};
  const uint16_t* xp;
  if (padded) {
    if (!in_f16 || sw != 1 || xs.h != C * xs.c) return -1;
    g.Wq = xs.c;
    g.plane = xs.b;
    g.per_b = xs.b;
    xp = static_cast<const uint16_t*>(x);
  } else {
    uint16_t* ws = reinterpret_cast<uint16_t*>(align64(static_cast<float*>(workspace)));
    if (in_f16)
      pad_input(g, static_cast<const uint16_t*>(x), xs, ws, slack_f16(g), nthreads, convert_row<uint16_t, uint16_t>);
    else
      pad_input(g, static_cast<const float*>(x), xs, ws, slack_f16(g), nthreads, f32_row_to_f16);
    xp = ws;
  }
  const int64_t Cf = O / (R * R), Hf = g.Ho * R, Wf = g.Wo * R;
  if (out && !zero_border(out, os, B, Cf, Hf, Wf, prm[P_ZT], prm[P_ZB], prm[P_ZL], prm[P_ZR], nthreads)) return -1;
  if (out2 && !zero_border(out2, o2s, B, Cf, Hf, Wf, prm[P_Z2T], prm[P_Z2B], prm[P_Z2L], prm[P_Z2R], nthreads))
    return -1;

  // Kept weights grouped by (input block, output channel), each group in address order.
  const int64_t blocks = split_blocks(C, O, rowptr[O], prm[P_KH] * prm[P_KW], R);
  std::vector<int64_t> rp(blocks * (O + 1) + 1, 0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = rowptr[o]; k < rowptr[o + 1]; ++k) ++rp[(cin[k] / SPLIT_CHANNELS % blocks) * (O + 1) + o + 1];
  for (int64_t i = 1; i <= blocks * (O + 1); ++i) rp[i] += rp[i - 1];
  std::vector<int64_t> fill(rp.begin(), rp.end() - 1);
  std::vector<Entry> entries(rowptr[O]);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = rowptr[o]; k < rowptr[o + 1]; ++k) {
      const int64_t off = entry_offset(g, cin[k], kpos[k]);
      if (off < 0) return -2;
      entries[fill[(cin[k] / SPLIT_CHANNELS % blocks) * (O + 1) + o]++] = Entry{(int32_t)off, (uint32_t)val[k]};
    }
  for (int64_t i = 0; i < blocks * (O + 1); ++i)
    std::sort(entries.begin() + rp[i], entries.begin() + rp[i + 1],
              [](const Entry& a, const Entry& b) { return a.off < b.off; });

  const int nvx = g.Wo <= HV ? 1 : HNV;
  const int64_t twx = nvx * HV;
  const int64_t ctiles = (g.Wo + twx - 1) / twx;
  const int64_t per_chunk = std::max<int64_t>(1, 256 / twx);
  const int64_t chunks = (ctiles + per_chunk - 1) / per_chunk;
  const int64_t items = B * g.rtiles * chunks;
  const int64_t xstride = sh * C * g.Wq;
  const bool relu = prm[P_RELU] != 0;
  const bool stream = B * O * g.Ho * g.Wo >= (int64_t(1) << 20);
  const bool res16 = prm[P_RES_F16] != 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t n = 0; n < items; ++n) {
    const int64_t b = n / (g.rtiles * chunks), rem = n % (g.rtiles * chunks);
    const int64_t rt = rem / chunks, ch = rem % chunks;
    const int64_t y0 = rt * HTR;
    const int64_t ct0 = ch * per_chunk;
    const Item it{xp + b * g.per_b + y0 * xstride, entries.data(), rp.data(), blocks, bias, O, xstride, g.Wo, y0,
                  (int)std::min<int64_t>(HTR, g.Ho - y0), ct0, std::min<int64_t>(ctiles, ct0 + per_chunk), res16,
                  stream};
    float* out_b = out ? out + b * os.b : nullptr;
    uint16_t* out2_b = out2 ? out2 + b * o2s.b : nullptr;
    const char* res_b = residual ? reinterpret_cast<const char*>(residual) + b * rs.b * (res16 ? 2 : 4) : nullptr;
    if (nvx == 1)
      item_any<1>(it, relu, R, out_b, os, out2_b, o2s, res_b, rs, res_scale);
    else
      item_any<HNV>(it, relu, R, out_b, os, out2_b, o2s, res_b, rs, res_scale);
  }
  return 0;
#endif
}

}  // extern "C"
