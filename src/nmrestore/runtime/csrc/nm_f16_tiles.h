// The fp16 kernel's tile math (nm_fp16.cpp): the tile shape, the epilogue and its stores, one
// output channel's tile, a group of channels sharing positions, and the prefetch of the next row
// tile's input rows. Included by nm_fp16.cpp only.
#pragma once
#include "nm_half_common.h"

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

// A whole vector's store bypassing the caches when asked and aligned (put16 / put16h: nm_half_common.h).
inline void put32h(uint16_t* p, __m512h v, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), _mm512_castph_si512(v));
  else
    _mm512_storeu_ph(p, v);
}

template <bool RELU, bool RES, int NVX>
inline void store(__m512h (&acc)[HTR][NVX], const Sink& s, float bias, float res_scale, int nrows, int ncols);

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
  store<RELU, RES, NVX>(acc, s, bias, res_scale, nrows, ncols);
}

// A tile's sums (the bias already in them without a residual) through the epilogue into `s`.
template <bool RELU, bool RES, int NVX>
inline void store(__m512h (&acc)[HTR][NVX], const Sink& s, float bias, float res_scale, int nrows, int ncols) {
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

// The kept weights of a group of up to 4 output channels that keep the same positions (a dense conv,
// masks shared by blocks of output channels): one offset and a weight per channel.
struct GroupEntry {
  int32_t off;
  uint16_t w[4];
  uint16_t pad[2];
};

// NB output channels of one tile together: every input vector loaded once for NB FMAs (the f32
// kernel's Blocked). Without it a dense conv with few output channels (EDSR's last, 64->3 at the
// output size) read its whole window once per channel.
template <bool RELU, bool RES, int NVX, int NB>
inline void tile_group(const uint16_t* __restrict xh, const GroupEntry* __restrict en, int64_t n, int64_t xstride,
                       const float* bias, const Sink* s, float res_scale, int nrows, int ncols) {
  __m512h acc[NB][HTR][NVX];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) {
    const __m512h b0 = RES ? _mm512_setzero_ph() : _mm512_set1_ph((_Float16)(bias ? bias[j] : 0.f));
#pragma GCC unroll 8
    for (int r = 0; r < HTR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NVX; ++v) acc[j][r][v] = b0;
  }
  for (int64_t k = 0; k < n; ++k) {
    const uint16_t* p = xh + en[k].off;
    __m512h w[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) w[j] = _mm512_castsi512_ph(_mm512_set1_epi16((short)en[k].w[j]));
#pragma GCC unroll 8
    for (int r = 0; r < HTR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NVX; ++v) {
        const __m512h x = _mm512_loadu_ph(p + r * xstride + v * HV);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[j][r][v] = _mm512_fmadd_ph(w[j], x, acc[j][r][v]);
      }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) store<RELU, RES, NVX>(acc[j], s[j], bias ? bias[j] : 0.f, res_scale, nrows, ncols);
}

// How many output channels ahead a tile prefetches its residual (each tile reads 2 rows x 64
// columns of it, scattered over the channels, which the hardware prefetcher does not follow).
constexpr int RES_AHEAD = 4;

// Input channels per block of a split layer (see Item).
constexpr int64_t SPLIT_CHANNELS = 32;
// Output channels whose partial sums a split tile keeps aside at a time (16 KB at 2x64).
constexpr int64_t SPLIT_OUTPUTS = 64;
// Row tiles a work item walks down (fewer when that leaves under 8 items per thread).
constexpr int64_t BAND = 4;
// Densest layer that is split (a denser one finds its window in L1 often enough).
#ifndef NMK_HSPLIT
#define NMK_HSPLIT 0.3
#endif
constexpr double SPLIT_MAX_DENSITY = NMK_HSPLIT;

// Prefetches into L2, a share after every channel-tile, the input rows that the next row tile of
// the same columns reads and this one does not: a work item walks down a band of row tiles, so the
// next one runs on this core, and a conv's input, streamed out by the conv before, is in no cache.
// (The f32 kernel's NextRows, for 2-byte elements.)
class Ahead {
 public:
  Ahead() = default;
  // rows [0, rows) from `base`, `row_bytes` apart, each `channels` segments of `bytes` bytes
  // `chan_bytes` apart; spread over `tiles` calls of advance()
  Ahead(const char* base, int64_t rows, int64_t row_bytes, int64_t channels, int64_t chan_bytes, int64_t bytes,
        int64_t tiles)
      : base_(base),
        row_bytes_(row_bytes),
        chan_bytes_(chan_bytes),
        channels_(channels),
        lines_((bytes + 63) / 64),
        total_(rows * channels * lines_),
        per_tile_((total_ + std::max<int64_t>(1, tiles) - 1) / std::max<int64_t>(1, tiles)),
        at_(base) {}

  void advance() {
    for (const int64_t end = std::min(total_, done_ + per_tile_); done_ < end; ++done_) {
      __builtin_prefetch(at_ + line_ * 64, 0, 2);
      if (++line_ == lines_) {
        line_ = 0;
        if (++c_ == channels_) c_ = 0, ++r_;
        at_ = base_ + r_ * row_bytes_ + c_ * chan_bytes_;
      }
    }
  }

 private:
  const char* base_ = nullptr;
  int64_t row_bytes_ = 0, chan_bytes_ = 0, channels_ = 1, lines_ = 1, total_ = 0, per_tile_ = 0;
  const char* at_ = nullptr;
  int64_t done_ = 0, line_ = 0, c_ = 0, r_ = 0;
};

#endif  // NMK_F16

}  // namespace
