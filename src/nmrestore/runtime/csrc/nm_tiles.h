// The f32 tile math of nm_kernels.cpp (its only includer): the vector type and tile shape, loads,
// broadcasts and streamed stores, the epilogue, and one output channel / pair / block of channels
// of one tile (channel_tiles). The work items, the padding and the entry points are in the .cpp.
#pragma once
#include "nm_common.h"
#include "nm_weights.h"
#if defined(__AVX512F__) && !defined(NMK_VB)
#include <immintrin.h>
#define NMK_STREAM 1
#endif

#if defined(NMK_VB)
// tile shape given on the command line (experiments)
#elif defined(__AVX512F__)
#define NMK_VB 64
#define NMK_TR 2
#define NMK_NV 4
#elif defined(__AVX__)
#define NMK_VB 32
#define NMK_TR 2
#define NMK_NV 4
#else
#define NMK_VB 16
#define NMK_TR 3
#define NMK_NV 4
#endif

namespace {

// aligned(4): every load is an unaligned load (tile columns start anywhere).
typedef float vf __attribute__((vector_size(NMK_VB), aligned(4)));
constexpr int VW = NMK_VB / 4;      // floats per vector
constexpr int TR = NMK_TR;          // output rows per tile
constexpr int NV = NMK_NV;          // vectors per tile row
constexpr int TW = NV * VW;         // output columns per tile

// The same vector when its address is a whole number of vectors (see Grouped).
typedef float vfa __attribute__((vector_size(NMK_VB), aligned(NMK_VB)));

inline vf vload(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline vf aload(const float* p) { return *reinterpret_cast<const vfa*>(p); }
// -0.f, not 0.f, is the identity of + for every v (-0.f + 0.f is +0.f), so this compiles to one
// broadcast; vf{} + v made a scalar add on the FMA ports before every broadcast.
inline vf vbcast(float v) { return -vf{} + v; }

// Stores a vector at p bypassing the caches when p is vector-aligned, else an ordinary store. For
// outputs written once and read only by the next layer (see conv_item_shuffle); the caller fences.
inline void store_stream(float* p, const vf& v) {
#ifdef NMK_STREAM
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, (__m512)v);
    return;
  }
#endif
  std::memcpy(p, &v, sizeof(vf));
}

inline void stream_fence() {
#ifdef NMK_STREAM
  _mm_sfence();
#endif
}

// Outputs of at least this many floats (4 MiB: more than the L2 caches of two cores hold) are
// written with non-temporal stores: a cached store first reads the line it overwrites. Whole EDSR
// x2 on the f32 engine (320x180, 2 threads, every conv's output 15-59 MB, interleaved, slowed
// machine) against cached stores: 1.30x (4:32) and 1.50x (2:32) with masks shared by blocks of 16
// channels, 1.03x (4:32) and 1.06x (2:32) with per-channel masks.
constexpr int64_t STREAM_MIN_FLOATS = int64_t(1) << 20;

// Lane indices that interleave two vectors a, b (lanes 0..VW-1 of a, VW.. of b) as a0 b0 a1 b1 ...:
// from their first halves (lo) or their second halves (hi).
typedef int32_t vi __attribute__((vector_size(NMK_VB)));
inline vi interleave_lo() {
  vi m;
  for (int i = 0; i < VW; ++i) m[i] = i / 2 + (i % 2) * VW;
  return m;
}
inline vi interleave_hi() {
  vi m;
  for (int i = 0; i < VW; ++i) m[i] = VW / 2 + i / 2 + (i % 2) * VW;
  return m;
}

using namespace nmk;  // Entry, Layer, Blocked, ...


// Epilogue: out = act(res_scale * (conv + bias) + residual), act = ReLU or identity. Fusing the
// residual sum and the ReLU saves a full pass over the output for each. Output and residual rows
// are strided (ostride / rstride_res floats apart), so either may be a plain (B, O, Ho, Wo) tensor
// or the valid region of a padded hand-off buffer.
template <bool RELU, bool RES, int NVX>
inline void store_tile(vf (&acc)[TR][NVX], float* __restrict out, int64_t ostride, const float* __restrict res,
                       int64_t res_stride, float res_scale, int nrows, int ncols, bool stream) {
  const vf z = vbcast(0.f), scale = vbcast(res_scale);
  for (int r = 0; r < nrows; ++r) {
    float* o = out + r * ostride;
    float tmp[NVX * VW];
    if (RES) {
      const float* rr = res + r * res_stride;
      if (ncols == NVX * VW) {
        for (int v = 0; v < NVX; ++v) acc[r][v] = acc[r][v] * scale + vload(rr + v * VW);
      } else {
        std::memset(tmp, 0, sizeof(tmp));
        std::memcpy(tmp, rr, sizeof(float) * ncols);
        for (int v = 0; v < NVX; ++v) acc[r][v] = acc[r][v] * scale + vload(tmp + v * VW);
      }
    }
    if (RELU)
      for (int v = 0; v < NVX; ++v) acc[r][v] = acc[r][v] > z ? acc[r][v] : z;
    // Only the ncols valid columns are stored: a padded hand-off buffer keeps its zero border.
    if (ncols == NVX * VW) {
      if (stream)
        for (int v = 0; v < NVX; ++v) store_stream(o + v * VW, acc[r][v]);
      else
        for (int v = 0; v < NVX; ++v) std::memcpy(o + v * VW, &acc[r][v], sizeof(vf));
    } else {
      for (int v = 0; v < NVX; ++v) std::memcpy(tmp + v * VW, &acc[r][v], sizeof(vf));
      std::memcpy(o, tmp, sizeof(float) * ncols);
    }
  }
}

template <int NVX, bool ALIGNED = false>
inline void accumulate(vf (&acc)[TR][NVX], const float* __restrict xb, const Entry* __restrict ent, int64_t nnz,
                       int64_t rstride) {
  for (int64_t k = 0; k < nnz; ++k) {
    const float* p = xb + ent[k].off;
    const vf w = vbcast(ent[k].val);
#pragma GCC unroll 16
    for (int r = 0; r < TR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NVX; ++v)
        acc[r][v] += w * (ALIGNED ? aload(p + r * rstride + v * VW) : vload(p + r * rstride + v * VW));
  }
}

template <int NVX>
inline void init_tile(vf (&acc)[TR][NVX], float bias) {
#pragma GCC unroll 16
  for (int r = 0; r < TR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NVX; ++v) acc[r][v] = vbcast(bias);
}

// Two output channels at once: an input position both keep is loaded once for both.
template <int NVX, bool ALIGNED = false>
inline void accumulate2(vf (&a)[TR][NVX], vf (&b)[TR][NVX], const float* __restrict xb, const Entry2* __restrict ent,
                        int64_t n, int64_t rstride) {
  for (int64_t k = 0; k < n; ++k) {
    const float* p = xb + ent[k].off;
    const vf wa = vbcast(ent[k].va), wb = vbcast(ent[k].vb);
#pragma GCC unroll 16
    for (int r = 0; r < TR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NVX; ++v) {
        const vf x = ALIGNED ? aload(p + r * rstride + v * VW) : vload(p + r * rstride + v * VW);
        a[r][v] += wa * x;
        b[r][v] += wb * x;
      }
  }
}

// sum[r][j] += t[r][u + j] for the NVX * VW columns of a tile.
template <int NA, int NVX>
inline void add_shifted(float (&sum)[TR][NVX * VW], vf (&t)[TR][NA], int u) {
  alignas(64) float tmp[NA * VW];
#pragma GCC unroll 4
  for (int r = 0; r < TR; ++r) {
    for (int v = 0; v < NA; ++v) std::memcpy(tmp + v * VW, &t[r][v], sizeof(vf));
    for (int v = 0; v < NVX; ++v) {
      vf acc = aload(&sum[r][v * VW]) + vload(tmp + u + v * VW);
      std::memcpy(&sum[r][v * VW], &acc, sizeof(vf));
    }
  }
}

template <int NVX>
inline void copy_tile(vf (&dst)[TR][NVX], const vf (&src)[TR][NVX]) {
#pragma GCC unroll 16
  for (int r = 0; r < TR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NVX; ++v) dst[r][v] = src[r][v];
}

template <int NA>
inline void zero_tile(vf (&t)[TR][NA]) { init_tile<NA>(t, 0.f); }

// Output channel o of one tile, group by group (see Grouped); a: how far xb is past a vector boundary.
template <int NVX>
inline void grouped_channel(const float* __restrict xb, const Grouped& gr, int64_t o, int64_t rstride, int a,
                            float (&sum)[TR][NVX * VW]) {
  for (size_t g = 0; g < gr.w.size(); ++g) {
    const Weights& w = gr.w[g];
    const int64_t k0 = w.rowptr[o], n = w.rowptr[o + 1] - k0;
    if (n == 0) continue;
    const int u = (int)((a + gr.shift[g]) % VW);
    if (u == 0) {
      vf t[TR][NVX];
      zero_tile<NVX>(t);
      accumulate<NVX, true>(t, xb, w.ent + k0, n, rstride);
      add_shifted<NVX, NVX>(sum, t, 0);
    } else {
      vf t[TR][NVX + 1];
      zero_tile<NVX + 1>(t);
      accumulate<NVX + 1, true>(t, xb - u, w.ent + k0, n, rstride);
      add_shifted<NVX + 1, NVX>(sum, t, u);
    }
  }
}

// Output channels o and o + 1 (o even) of one tile, group by group, sharing the loads both keep.
template <int NVX>
inline void grouped_pair(const float* __restrict xb, const Grouped& gr, int64_t o, int64_t rstride, int a,
                         float (&sa)[TR][NVX * VW], float (&sb)[TR][NVX * VW]) {
  const int64_t p = o / 2;
  for (size_t g = 0; g < gr.w.size(); ++g) {
    const Paired& pw = *gr.w[g].pairs;
    const Entry* s = pw.single.data();
    const int u = (int)((a + gr.shift[g]) % VW);
    auto run = [&](auto& ta, auto& tb, const float* base) {
      constexpr int NA = sizeof(ta[0]) / sizeof(vf);
      zero_tile<NA>(ta);
      zero_tile<NA>(tb);
      accumulate2<NA, true>(ta, tb, base, pw.both.data() + pw.bp[p], pw.bp[p + 1] - pw.bp[p], rstride);
      accumulate<NA, true>(ta, base, s + pw.sp[2 * p], pw.sp[2 * p + 1] - pw.sp[2 * p], rstride);
      accumulate<NA, true>(tb, base, s + pw.sp[2 * p + 1], pw.sp[2 * p + 2] - pw.sp[2 * p + 1], rstride);
      add_shifted<NA, NVX>(sa, ta, u);
      add_shifted<NA, NVX>(sb, tb, u);
    };
    if (u == 0) {
      vf ta[TR][NVX], tb[TR][NVX];
      run(ta, tb, xb);
    } else {
      vf ta[TR][NVX + 1], tb[TR][NVX + 1];
      run(ta, tb, xb - u);
    }
  }
}

template <int NVX>
inline void bias_tile(float (&sum)[TR][NVX * VW], float bias) {
  for (int r = 0; r < TR; ++r)
    for (int j = 0; j < NVX * VW; ++j) sum[r][j] = bias;
}

template <bool RELU, bool RES, int NVX>
inline void conv_tile(const float* __restrict xb, const Entry* __restrict ent, int64_t nnz, int64_t rstride,
                      float bias, float* __restrict out, int64_t ostride, const float* __restrict res,
                      int64_t res_stride, float res_scale, int nrows, int ncols, bool stream) {
  vf acc[TR][NVX];
  init_tile<NVX>(acc, bias);
  accumulate<NVX>(acc, xb, ent, nnz, rstride);
  store_tile<RELU, RES, NVX>(acc, out, ostride, res, res_stride, res_scale, nrows, ncols, stream);
}

// Output channels o and o + 1 (o even) of one tile, sharing the loads of the positions both keep.
template <bool RELU, bool RES, int NVX>
inline void pair_tile(const float* __restrict xb, const Paired& pw, int64_t o, int64_t rstride, const float* bias,
                      float* out_a, float* out_b, int64_t ostride, const float* res_a, const float* res_b,
                      int64_t res_stride, float res_scale, int nrows, int ncols, bool stream) {
  const int64_t p = o / 2;
  vf a[TR][NVX], b[TR][NVX];
  init_tile<NVX>(a, bias ? bias[o] : 0.f);
  init_tile<NVX>(b, bias ? bias[o + 1] : 0.f);
  accumulate2<NVX>(a, b, xb, pw.both.data() + pw.bp[p], pw.bp[p + 1] - pw.bp[p], rstride);
  const Entry* s = pw.single.data();
  accumulate<NVX>(a, xb, s + pw.sp[2 * p], pw.sp[2 * p + 1] - pw.sp[2 * p], rstride);
  accumulate<NVX>(b, xb, s + pw.sp[2 * p + 1], pw.sp[2 * p + 2] - pw.sp[2 * p + 1], rstride);
  store_tile<RELU, RES, NVX>(a, out_a, ostride, res_a, res_stride, res_scale, nrows, ncols, stream);
  store_tile<RELU, RES, NVX>(b, out_b, ostride, res_b, res_stride, res_scale, nrows, ncols, stream);
}

// The epilogue of a grouped tile: its sum (bias included) through store_tile.
template <bool RELU, bool RES, int NVX>
inline void store_sum(const float (&sum)[TR][NVX * VW], float* out, int64_t ostride, const float* res,
                      int64_t res_stride, float res_scale, int nrows, int ncols, bool stream) {
  vf acc[TR][NVX];
  for (int r = 0; r < TR; ++r)
    for (int v = 0; v < NVX; ++v) acc[r][v] = aload(&sum[r][v * VW]);
  store_tile<RELU, RES, NVX>(acc, out, ostride, res, res_stride, res_scale, nrows, ncols, stream);
}

// Output channels o..o+OB-1 (one block, o % OB == 0) of one tile, in sub-tiles of NVB vectors per
// row: OB x TR x NVB accumulators (16 at 4 x 2 x 2), so each input vector loaded feeds OB FMAs.
template <bool RELU, bool RES, int NVX, class Out, class Res>
inline void block_tiles(const float* __restrict xb, const Blocked& bl, int64_t o, int64_t rstride, const float* bias,
                        Out out_at, int64_t ostride, Res res_at, int64_t res_stride, float res_scale, int nrows,
                        int ncols, bool stream) {
#ifndef NMK_NVB
#define NMK_NVB 2
#endif
  constexpr int NVB = NVX < NMK_NVB ? NVX : NMK_NVB;
  const int64_t b = o / OB;
  const BlockEntry* __restrict ent = bl.ent.data() + bl.bp[b];
  const int64_t n = bl.bp[b + 1] - bl.bp[b];
  for (int s = 0; s < NVX / NVB; ++s) {
    const int c0 = s * NVB * VW;
    if (c0 >= ncols) break;
    const int nc = std::min(ncols - c0, NVB * VW);
    vf acc[OB][TR][NVB];
#pragma GCC unroll 16
    for (int j = 0; j < OB; ++j) init_tile<NVB>(acc[j], bias ? bias[o + j] : 0.f);
    for (int64_t k = 0; k < n; ++k) {
      const float* p = xb + c0 + ent[k].off;
      vf x[TR][NVB];
#pragma GCC unroll 16
      for (int r = 0; r < TR; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < NVB; ++v) x[r][v] = vload(p + r * rstride + v * VW);
#pragma GCC unroll 16
      for (int j = 0; j < OB; ++j) {
        const vf w = vbcast(ent[k].val[j]);
#pragma GCC unroll 16
        for (int r = 0; r < TR; ++r)
#pragma GCC unroll 16
          for (int v = 0; v < NVB; ++v) acc[j][r][v] += w * x[r][v];
      }
    }
    for (int j = 0; j < OB; ++j) {
      const float* res = res_at(o + j);
      store_tile<RELU, RES, NVB>(acc[j], out_at(o + j) + c0, ostride, res ? res + c0 : nullptr, res_stride, res_scale,
                                 nrows, nc, stream);
    }
  }
}

// One output channel of one tile, or the pair from o (even) when the layer pairs and o + 1 < O,
// or the block from o when the layer's channels are in blocks and the block ends by O:
// computed and stored (out_at(o), res_at(o) give a channel's output and residual). Returns how
// many channels it did.
template <bool RELU, bool RES, int NVX, class Out, class Res>
inline int channel_tiles(const float* __restrict xb, const Layer& L, int64_t o, int64_t O, int64_t rstride,
                         const float* bias, Out out_at, int64_t ostride, Res res_at, int64_t res_stride,
                         float res_scale, int nrows, int ncols, bool stream) {
  if (L.blocked && o % OB == 0 && o + OB <= O && o / OB + 1 < (int64_t)L.blocked->bp.size()) {
    block_tiles<RELU, RES, NVX>(xb, *L.blocked, o, rstride, bias, out_at, ostride, res_at, res_stride, res_scale,
                                nrows, ncols, stream);
    return OB;
  }
  const bool pair = L.paired && o % 2 == 0 && o + 1 < O;
  if (L.grouped) {
    const int mis = (int)(((uintptr_t)xb / sizeof(float)) % VW);
    alignas(64) float sa[TR][NVX * VW], sb[TR][NVX * VW];
    bias_tile<NVX>(sa, bias ? bias[o] : 0.f);
    if (pair) {
      bias_tile<NVX>(sb, bias ? bias[o + 1] : 0.f);
      grouped_pair<NVX>(xb, *L.grouped, o, rstride, mis, sa, sb);
      store_sum<RELU, RES, NVX>(sb, out_at(o + 1), ostride, res_at(o + 1), res_stride, res_scale, nrows, ncols,
                                stream);
    } else {
      grouped_channel<NVX>(xb, *L.grouped, o, rstride, mis, sa);
    }
    store_sum<RELU, RES, NVX>(sa, out_at(o), ostride, res_at(o), res_stride, res_scale, nrows, ncols, stream);
    return pair ? 2 : 1;
  }
  if (pair) {
    pair_tile<RELU, RES, NVX>(xb, *L.all.pairs, o, rstride, bias, out_at(o), out_at(o + 1), ostride, res_at(o),
                              res_at(o + 1), res_stride, res_scale, nrows, ncols, stream);
    return 2;
  }
  const int64_t k0 = L.all.rowptr[o];
  conv_tile<RELU, RES, NVX>(xb, L.all.ent + k0, L.all.rowptr[o + 1] - k0, rstride, bias ? bias[o] : 0.f, out_at(o),
                            ostride, res_at(o), res_stride, res_scale, nrows, ncols, stream);
  return 1;
}

}  // namespace
