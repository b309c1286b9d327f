// Shared by the f32 kernels (nm_kernels.cpp) and the bf16 ones (nm_bf16.cpp): the padded workspace
// geometry, the parameter block of the conv entry points, the padding pass (which also converts
// f32 <-> bf16), the zero border of a hand-off output and the tile offsets of the kept weights.
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace nmk {

struct Geometry {
  int64_t B, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t Hp, Wp, Ho, Wo, Wq, rtiles, Hpa, plane, per_b;
};

// vw: elements per 64-byte vector of the workspace type (rows start on one); tr: output rows per tile.
inline Geometry geometry(int64_t B, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t sh,
                         int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t vw, int64_t tr) {
  Geometry g{B, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  g.Hp = H + 2 * ph;
  g.Wp = W + 2 * pw;
  g.Ho = (g.Hp - dh * (KH - 1) - 1) / sh + 1;
  g.Wo = (g.Wp - dw * (KW - 1) - 1) / sw + 1;
  // Columns per phase, rounded to whole vectors so every padded row starts vector-aligned.
  g.Wq = ((g.Wp + sw - 1) / sw + vw - 1) / vw * vw;
  g.rtiles = (g.Ho + tr - 1) / tr;
  // Extra zero rows so the last row tile never reads past its phase plane.
  g.Hpa = std::max(g.Hp, (g.rtiles * tr - 1) * sh + dh * (KH - 1) + 1);
  g.plane = g.Hpa * C * g.Wq;  // one phase: Hpa rows of C channels of Wq columns
  g.per_b = sw * g.plane;
  return g;
}

inline int64_t rows_read(int64_t H, int64_t KH, int64_t sh, int64_t ph, int64_t dh, int64_t tr) {
  const int64_t Ho = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1;
  const int64_t rtiles = (Ho + tr - 1) / tr;
  return std::max(H + 2 * ph, (rtiles * tr - 1) * sh + dh * (KH - 1) + 1);
}

// Strides (elements) of a 4-d (B, C, H, W) operand whose W axis is contiguous.
struct Strides {
  int64_t b, c, h;
};

// Parameters of the conv entry points, one int64 array (one ctypes argument instead of forty).
enum Param {
  P_B, P_C, P_H, P_W, P_O, P_KH, P_KW, P_SH, P_SW, P_PH, P_PW, P_DH, P_DW,
  P_XSB, P_XSC, P_XSH,        // input strides (elements); W is contiguous
  P_IN_PADDED,                // 1: x is already padded (a hand-off view read in place)
  P_RELU,
  P_RSB, P_RSC, P_RSH,        // residual strides
  P_OSB, P_OSC, P_OSH,        // output strides (of the final, shuffled tensor)
  P_SHUFFLE,                  // pixel-shuffle factor (0/1: none)
  P_ZT, P_ZB, P_ZL, P_ZR,     // zero border to write around the output: rows above/below, columns left/right
  P_THREADS,
  // bf16 entry point only (nm_bf16.cpp)
  P_IN_BF16,                  // 1: x holds bf16 (else f32)
  P_OUT_F32,                  // 1: write the f32 output (out)
  P_O2SB, P_O2SC, P_O2SH,     // strides of the bf16 output (out2; null pointer: none)
  P_Z2T, P_Z2B, P_Z2L, P_Z2R, // its zero border, as P_Z*
  P_RES_F16,                  // 16-bit entry points: 1: the residual holds the kernel's 16-bit dtype (fp16 / bf16)
  P_COUNT
};

inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// f32 -> bf16, round to nearest even (NaN kept a quiet NaN), as torch's .to(torch.bfloat16).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// Converts n elements of one input row into the workspace element type.
template <typename S, typename D>
inline void convert_row(D* dst, const S* src, int64_t n) {
  if constexpr (sizeof(S) == sizeof(D)) {
    std::memcpy(dst, src, sizeof(D) * n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);  // f32 -> bf16 only
  }
}

// Pads x (B, C, H, W; strides xs) into the workspace laid out (image, stride phase, row, channel,
// column), converting S to D; for a column stride sw > 1 the columns are split into sw phases so
// every load of a tile row is contiguous. One (image, phase, row) per iteration. The row converter
// is a parameter so the bf16 file can pass a vectorised one.
template <typename S, typename D, typename Conv>
void pad_input(const Geometry& g, const S* x, Strides xs, D* ws, int64_t tail, int nthreads, Conv conv) {
  const int64_t B = g.B, C = g.C, H = g.H, W = g.W, sw = g.sw, pw = g.pw;
  const int64_t rows = B * sw * g.Hpa;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = i / (sw * g.Hpa), rem = i % (sw * g.Hpa);
    const int64_t p = rem / g.Hpa, r = rem % g.Hpa;
    D* dst = ws + b * g.per_b + p * g.plane + r * C * g.Wq;
    const int64_t ir = r - g.ph;
    if (ir < 0 || ir >= H) {
      std::memset(dst, 0, sizeof(D) * C * g.Wq);
      continue;
    }
    for (int64_t c = 0; c < C; ++c) {
      D* d = dst + c * g.Wq;
      const S* s = x + b * xs.b + c * xs.c + ir * xs.h;
      if (sw == 1) {
        std::memset(d, 0, sizeof(D) * pw);
        conv(d + pw, s, W);
        std::memset(d + pw + W, 0, sizeof(D) * (g.Wq - pw - W));
      } else {
        for (int64_t j = 0; j < g.Wq; ++j) {
          const int64_t ic = j * sw + p - pw;
          D v{};
          if (ic >= 0 && ic < W) conv(&v, s + ic, 1);
          d[j] = v;
        }
      }
    }
  }
  std::memset(ws + B * g.per_b, 0, sizeof(D) * tail);
}

// Zeroes the border of a hand-off output buffer (the tiles write only valid positions): zt/zb rows
// above/below the (Cf, Hf, Wf) image, zl/zr columns left/right of every channel row. Returns false
// when the strides do not describe such a buffer.
template <typename T>
bool zero_border(T* out, Strides os, int64_t B, int64_t Cf, int64_t Hf, int64_t Wf, int64_t zt, int64_t zb,
                 int64_t zl, int64_t zr, int nthreads) {
  if (!(zt || zb || zl || zr)) return true;
  if (os.h != Cf * os.c || os.c < zl + Wf + zr) return false;
  const int64_t rows = B * (zt + Hf + zb);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = i / (zt + Hf + zb), r = i % (zt + Hf + zb) - zt;
    T* row = out + b * os.b + r * os.h - zl;
    if (r < 0 || r >= Hf) {
      std::memset(row, 0, sizeof(T) * os.h);
      continue;
    }
    for (int64_t c = 0; c < Cf; ++c) {
      std::memset(row + c * os.c, 0, sizeof(T) * zl);
      std::memset(row + c * os.c + zl + Wf, 0, sizeof(T) * (os.c - zl - Wf));
    }
  }
  return true;
}

// The 16-bit conv entry points' common start (nm_bf16.cpp, nm_fp16.cpp): checks the parameters
// against `g` (built for the kernel's vector width and tile rows), then takes a padded 16-bit
// hand-off view in place (`g` then describes it) or pads the input into the workspace, f32 rows
// through `f32_row`, and zeroes the outputs' hand-off borders. `out` is cleared unless P_OUT_F32.
// Returns the padded input, or nullptr on a bad geometry.
template <typename F32Row>
const uint16_t* half_input(const int64_t* prm, Geometry& g, const void* x, void* workspace, int64_t slack,
                           const void* residual, float*& out, uint16_t* out2, F32Row f32_row) {
  const int64_t B = prm[P_B], C = prm[P_C], O = prm[P_O], sh = prm[P_SH], sw = prm[P_SW];
  const int R = prm[P_SHUFFLE] > 1 ? (int)prm[P_SHUFFLE] : 1;
  const int nthreads = prm[P_THREADS] > 0 ? (int)prm[P_THREADS] : 1;
  if (!prm[P_OUT_F32]) out = nullptr;
  if (g.Ho <= 0 || g.Wo <= 0 || sh < 1 || sw < 1 || prm[P_DH] < 1 || prm[P_DW] < 1) return nullptr;
  if (R > 4 || (R > 1 && (O % (R * R) != 0 || residual != nullptr))) return nullptr;
  if (out == nullptr && out2 == nullptr) return nullptr;
  const Strides xs{prm[P_XSB], prm[P_XSC], prm[P_XSH]};
  const uint16_t* xp;
  if (prm[P_IN_PADDED] != 0) {
    if (!prm[P_IN_BF16] || sw != 1 || xs.h != C * xs.c) return nullptr;
    g.Wq = xs.c;
    g.plane = xs.b;
    g.per_b = xs.b;
    xp = static_cast<const uint16_t*>(x);
  } else {
    uint16_t* ws = reinterpret_cast<uint16_t*>(align64(static_cast<float*>(workspace)));
    if (prm[P_IN_BF16])
      pad_input(g, static_cast<const uint16_t*>(x), xs, ws, slack, nthreads, convert_row<uint16_t, uint16_t>);
    else
      pad_input(g, static_cast<const float*>(x), xs, ws, slack, nthreads, f32_row);
    xp = ws;
  }
  const Strides os{prm[P_OSB], prm[P_OSC], prm[P_OSH]}, o2s{prm[P_O2SB], prm[P_O2SC], prm[P_O2SH]};
  const int64_t Cf = O / (R * R), Hf = g.Ho * R, Wf = g.Wo * R;
  if (out && !zero_border(out, os, B, Cf, Hf, Wf, prm[P_ZT], prm[P_ZB], prm[P_ZL], prm[P_ZR], nthreads))
    return nullptr;
  if (out2 && !zero_border(out2, o2s, B, Cf, Hf, Wf, prm[P_Z2T], prm[P_Z2B], prm[P_Z2L], prm[P_Z2R], nthreads))
    return nullptr;
  return xp;
}

// The 16-bit kernels' small entry points (nm_bf16.cpp, nm_fp16.cpp): whether the build has them,
// their tile, the workspace a self-padded input needs, the rows a conv reads, the slack after a
// hand-off buffer. PFX names them (nmk_PFX_*); HAS is 0 or 1; TR / TW / VW the tile rows, tile
// columns and elements per vector; GEOM and SLACK the file's geometry and slack functions.
#define NMK_HALF_ENTRY_POINTS(PFX, HAS, TR, TW, VW, GEOM, SLACK)                      \
  int nmk_has_##PFX() { return HAS; }                                                  \
  int nmk_##PFX##_tile_rows() { return TR; }                                           \
  int nmk_##PFX##_tile_cols() { return TW; }                                           \
  int64_t nmk_##PFX##_workspace(const int64_t* prm) {                                  \
    const Geometry g = GEOM(prm);                                                      \
    return g.B * g.per_b + SLACK(g) + 64;                                              \
  }                                                                                    \
  int64_t nmk_##PFX##_rows_read(int64_t H, int64_t KH, int64_t sh, int64_t ph, int64_t dh) { \
    return rows_read(H, KH, sh, ph, dh, TR);                                           \
  }                                                                                    \
  int64_t nmk_##PFX##_tail_slack(int64_t row_elems) { return TW + row_elems + 2 * VW; }

// Workspace offset (elements) of kept weight k relative to a tile's top-left input position;
// -1 when it does not fit 32 bits (a workspace beyond 8 GB: the caller runs dense).
inline int64_t entry_offset(const Geometry& g, int32_t cin, int32_t kpos) {
  const int64_t kh = kpos / g.KW, kw = kpos % g.KW;
  const int64_t phase = (kw * g.dw) % g.sw, q = (kw * g.dw) / g.sw;
  const int64_t off = phase * g.plane + (kh * g.dh * g.C + cin) * g.Wq + q;
  return off > INT32_MAX ? -1 : off;
}

}  // namespace nmk
