// bf16 N:M-sparse Conv2d: the direct sparse convolution of nm_kernels.cpp with bf16 activations and
// weights and f32 accumulation (AVX512-BF16 `vdpbf16ps`). Compiled in only when the compiler targets
// AVX512-BF16 (-march=native on such a CPU, and nmrestore.runtime.kernel asked for it); otherwise
// nmk_has_bf16() is 0 and the engine runs its f32 kernel.
//
// Why bf16 here, measured on a Xeon with AVX512-BF16/AMX (one 64->64 3x3 conv, 1 thread): the f32
// kernel reaches ~15 GMAC/s at 2:4, half of the ~30 GMAC/s it reaches when its input tile fits
// in L1: a 2x64 tile's input rows (4 rows x 64 channels x 66 columns x 4 B = 67 KB) do not fit the
// 48 KB L1. In bf16 they do (34 KB), so the same loop order moves half the bytes and hits L1.
// `vdpbf16ps` itself is no faster than f32 FMA per MAC on that CPU (one per ~2 cycles, 32 MACs,
// against two 16-MAC FMAs per cycle), so the gain is the memory traffic, largest at 2:4/8:32.
//
// Inner loop: the kept weights of an output channel are taken in pairs (a, b) (a zero weight pads
// an odd count). vdpbf16ps needs each f32 lane's two bf16 operands side by side, so 32 columns of
// input a and of input b are interleaved with vpunpck{l,h}wd: lane i of the low half holds columns
// {0-3, 8-11, 16-19, 24-27}, the high half {4-7, 12-15, 20-23, 28-31}; the epilogue puts the
// columns back in order with one vpermt2ps per 16 columns, then adds bias/residual, applies the
// ReLU in f32, and writes an f32 output, a bf16 hand-off output (the next bf16 conv reads it in
// place), or both.
#include "nm_amx.h"
#include "nm_amx_block.h"
#include "nm_amx_tail.h"
#include "nm_half_common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__) && !defined(NMK_NO_BF16)
#define NMK_BF16 1
#include <immintrin.h>
#else
#define NMK_BF16 0
#endif

namespace {

using namespace nmk;

#ifndef NMK_BTR  // tile shape (overridable for experiments)
#define NMK_BTR 2
#define NMK_BNV 2
#endif
constexpr int BV = 32;         // bf16 columns per 512-bit vector
constexpr int BTR = NMK_BTR;   // output rows per tile
constexpr int BNV = NMK_BNV;   // vectors per tile row
constexpr int BTW = BV * BNV;  // output columns per tile

Geometry geometry_bf16(const int64_t* prm) {
  return geometry(prm[P_B], prm[P_C], prm[P_H], prm[P_W], prm[P_KH], prm[P_KW], prm[P_SH], prm[P_SW], prm[P_PH],
                  prm[P_PW], prm[P_DH], prm[P_DW], BV, BTR);
}

// Slack after the last image: a tile's last vector may read up to BTW + Wq elements past a row.
inline int64_t slack_bf16(const Geometry& g) { return BTW + g.Wq + 2 * BV; }

#if NMK_BF16

// Two kept weights of one output channel: their workspace offsets and their bf16 values (a low).
struct Pair {
  int32_t offa, offb;
  uint32_t w;
};

// Where a tile's results go: an f32 and/or a bf16 image (row strides in elements), with an
// optional f32 residual read through its own row stride.
struct Sink {
  float* f32;
  int64_t fstride;
  uint16_t* b16;
  int64_t bstride;
  const void* res;  // f32, or bf16 when res16
  int64_t rstride;
  bool res16;
};

template <bool RELU, bool RES, int NVX>
inline void tile(const uint16_t* __restrict xb, const Pair* __restrict pr, int64_t npairs, int64_t xstride,
                 float bias, const Sink& s, float res_scale, int nrows, int ncols) {
  __m512 lo[BTR][NVX], hi[BTR][NVX];
#pragma GCC unroll 8
  for (int r = 0; r < BTR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NVX; ++v) lo[r][v] = hi[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < npairs; ++k) {
    const uint16_t* pa = xb + pr[k].offa;
    const uint16_t* pb = xb + pr[k].offb;
    const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pr[k].w);
#pragma GCC unroll 8
    for (int r = 0; r < BTR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NVX; ++v) {
        const __m512i a = _mm512_loadu_si512(pa + r * xstride + v * BV);
        const __m512i b = _mm512_loadu_si512(pb + r * xstride + v * BV);
        lo[r][v] = _mm512_dpbf16_ps(lo[r][v], (__m512bh)_mm512_unpacklo_epi16(a, b), w);
        hi[r][v] = _mm512_dpbf16_ps(hi[r][v], (__m512bh)_mm512_unpackhi_epi16(a, b), w);
      }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512 vb = _mm512_set1_ps(bias), vs = _mm512_set1_ps(res_scale), zero = _mm512_setzero_ps();
  for (int r = 0; r < nrows; ++r)
    for (int v = 0; v < NVX; ++v)
      for (int h = 0; h < 2; ++h) {
        const int c0 = v * BV + h * 16;
        if (c0 >= ncols) break;
        const int n = std::min(16, ncols - c0);
        const __mmask16 m = (__mmask16)(n == 16 ? 0xffff : (1u << n) - 1);
        __m512 y = _mm512_add_ps(_mm512_permutex2var_ps(lo[r][v], h ? second : first, hi[r][v]), vb);
        if (RES) {
          const int64_t at = r * s.rstride + c0;
          const __m512 rv = s.res16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t*)s.res + at)), 16))
                                    : _mm512_maskz_loadu_ps(m, (const float*)s.res + at);
          y = _mm512_fmadd_ps(y, vs, rv);
        }
        if (RELU) y = _mm512_max_ps(y, zero);
        if (s.f32) _mm512_mask_storeu_ps(s.f32 + r * s.fstride + c0, m, y);
        if (s.b16) _mm256_mask_storeu_epi16(s.b16 + r * s.bstride + c0, m, (__m256i)_mm512_cvtneps_pbh(y));
      }
}

struct Item {
  const uint16_t* xrow;
  const Pair* pairs;
  const int64_t* prow;  // pairs of output channel o: prow[o]..prow[o+1]-1
  const float* bias;
  int64_t O, xstride, Wo, y0;
  int nrows;
  int64_t ct0, ct1;
  bool res16;  // the residual holds bf16 (else f32)
};

// Every tile of one work item, output channel innermost (the input rows stay in L1 meanwhile).
template <bool RELU, bool RES, int NVX>
void item(const Item& it, float* out_b, Strides os, uint16_t* out2_b, Strides o2s, const char* res_b, Strides rs,
          float res_scale) {
  const int64_t rsize = it.res16 ? 2 : 4;  // bytes per residual element
  constexpr int TWX = NVX * BV;
  for (int64_t ct = it.ct0; ct < it.ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, it.Wo - x0);
    for (int64_t o = 0; o < it.O; ++o) {
      const int64_t k0 = it.prow[o];
      const Sink s{out_b ? out_b + o * os.c + it.y0 * os.h + x0 : nullptr, os.h,
                   out2_b ? out2_b + o * o2s.c + it.y0 * o2s.h + x0 : nullptr, o2s.h,
                   RES ? res_b + (o * rs.c + it.y0 * rs.h + x0) * rsize : nullptr, rs.h, it.res16};
      tile<RELU, RES, NVX>(it.xrow + x0, it.pairs + k0, it.prow[o + 1] - k0, it.xstride,
                           it.bias ? it.bias[o] : 0.f, s, res_scale, it.nrows, ncols);
    }
  }
}

// With a fused pixel shuffle of factor R (see nm_kernels.cpp): the R channels of one (c, i) are
// computed into a small f32 buffer, then interleaved into the high-resolution rows.
template <bool RELU, int NVX>
void item_shuffle(const Item& it, int R, float* out_b, Strides os, uint16_t* out2_b, Strides o2s) {
  constexpr int TWX = NVX * BV;
  alignas(64) float tmp[4][BTR][TWX];  // R <= 4
  for (int64_t ct = it.ct0; ct < it.ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, it.Wo - x0);
    for (int64_t og = 0; og < it.O; og += R) {
      for (int j = 0; j < R; ++j) {
        const int64_t o = og + j, k0 = it.prow[o];
        const Sink s{&tmp[j][0][0], TWX, nullptr, 0, nullptr, 0, false};
        tile<RELU, false, NVX>(it.xrow + x0, it.pairs + k0, it.prow[o + 1] - k0, it.xstride,
                               it.bias ? it.bias[o] : 0.f, s, 1.f, it.nrows, TWX);
      }
      const int64_t c = og / (R * R), i = (og / R) % R;
      for (int r = 0; r < it.nrows; ++r) {
        const int64_t hr = (it.y0 + r) * R + i;
        float* df = out_b ? out_b + c * os.c + hr * os.h + x0 * R : nullptr;
        uint16_t* db = out2_b ? out2_b + c * o2s.c + hr * o2s.h + x0 * R : nullptr;
        const float* rows[4] = {tmp[0][r], tmp[1][r], tmp[2][r], tmp[3][r]};
        shuffle_row(rows, R, ncols, df, db, false, [](__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); },
                    [](float v) { return to_bf16(v); });
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
#define NMK_ITEM(A, B) item<A, B, NVX>(it, out_b, os, out2_b, o2s, res_b, rs, res_scale)
  if (relu && res_b) NMK_ITEM(true, true);
  else if (relu) NMK_ITEM(true, false);
  else if (res_b) NMK_ITEM(false, true);
  else NMK_ITEM(false, false);
#undef NMK_ITEM
}

// f32 -> bf16 row conversion, 16 at a time (round to nearest even, as torch's .to(bfloat16)).
void f32_row_to_bf16(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i*)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

#endif  // NMK_BF16

}  // namespace

extern "C" {

NMK_HALF_ENTRY_POINTS(bf16, NMK_BF16, BTR, BTW, BV, geometry_bf16, slack_bf16)

// Whether the bf16 conv runs masks shared by blocks of 16 output channels on AMX tiles here: compiled
// in (AMX-BF16), granted by the OS, and not switched off by NMRESTORE_DISABLE_AMX.
int nmk_has_amx() {
#if NMK_AMX && NMK_BF16
  return nmk_amx::amx_enabled() ? 1 : 0;
#else
  return 0;
#endif
}

// How many convs the AMX path ran in this process.
int64_t nmk_amx_convs() {
#if NMK_AMX && NMK_BF16
  return nmk_amx::amx_convs.load();
#else
  return 0;
#endif
}

// A residual block fused on AMX (nm_amx_block.h: nmk_amx::block): t = relu1 ? relu(conv1(x) + bias1) :
// conv1(x) + bias1, then out = act(res_scale * (conv2(t) + bias2) + residual), act = ReLU when
// P_RELU. prm is nmk_conv2d_bf16's for conv1 (3x3, stride 1, padding 1, C -> C), with conv2's
// epilogue (P_RELU, the residual's strides, P_RES_F16); x must be a padded bf16 hand-off view
// (P_IN_PADDED). The intermediate t stays in each thread's L2.
// Returns 0; -1 on a bad geometry; -3 when this build has no bf16 kernels; -4 when the block does
// not qualify (no AMX here, masks not shared by 16-channel blocks, another geometry): the caller
// runs the two convs.
int nmk_block_bf16(const int64_t* prm, const void* x, void* workspace, const int32_t* rowptr1, const int32_t* cin1,
                   const int32_t* kpos1, const uint16_t* val1, const float* bias1, int relu1, const int32_t* rowptr2,
                   const int32_t* cin2, const int32_t* kpos2, const uint16_t* val2, const float* bias2,
                   const float* residual, float res_scale, float* out, uint16_t* out2) {
#if !NMK_BF16
  (void)prm, (void)x, (void)workspace, (void)rowptr1, (void)cin1, (void)kpos1, (void)val1, (void)bias1, (void)relu1;
  (void)rowptr2, (void)cin2, (void)kpos2, (void)val2, (void)bias2, (void)residual, (void)res_scale, (void)out;
  (void)out2;
  return -3;
#elif !NMK_AMX
  (void)prm, (void)x, (void)workspace, (void)rowptr1, (void)cin1, (void)kpos1, (void)val1, (void)bias1, (void)relu1;
  (void)rowptr2, (void)cin2, (void)kpos2, (void)val2, (void)bias2, (void)residual, (void)res_scale, (void)out;
  (void)out2;
  return -4;
#else
  if (!prm[P_IN_PADDED] || residual == nullptr || !nmk_amx::amx_enabled()) return -4;
  Geometry g = geometry_bf16(prm);
  const uint16_t* xp = half_input(prm, g, x, workspace, slack_bf16(g), residual, out, out2, f32_row_to_bf16);
  if (xp == nullptr) return -1;
  const bool stream = prm[P_B] * prm[P_O] * g.Ho * g.Wo >= (int64_t(1) << 20);  // an f32 output (AmxSink)
  const nmk_amx::AmxSink sink{out, {prm[P_OSB], prm[P_OSC], prm[P_OSH]}, out2, {prm[P_O2SB], prm[P_O2SC], prm[P_O2SH]},
                              residual, {prm[P_RSB], prm[P_RSC], prm[P_RSH]}, prm[P_RES_F16] != 0, bias2, res_scale,
                              prm[P_RELU] != 0, stream};
  const int32_t* csr1[3] = {rowptr1, cin1, kpos1};
  const int32_t* csr2[3] = {rowptr2, cin2, kpos2};
  const int nthreads = prm[P_THREADS] > 0 ? (int)prm[P_THREADS] : 1;
  return nmk_amx::block(prm, g, xp, csr1, val1, bias1, relu1 != 0, csr2, val2, sink, nthreads) ? 0 : -4;
#endif
}

// EDSR's and RCAN's tail fused on AMX (nm_amx_tail.h: nmk_amx::tail): the upsampler conv with its
// pixel shuffle (prm: nmk_conv2d_bf16's, P_SHUFFLE > 1, bias1, ReLU when P_RELU) on x, a padded bf16
// hand-off view (P_IN_PADDED), then the dense last conv (prm2: its geometry, P_RELU, and the strides
// P_OS* of `out`, f32, no border) on the shuffled output, which stays in each thread's L2.
// Returns 0; -1 on a bad geometry; -3 when this build has no bf16 kernels; -4 when they do not
// qualify (no AMX here, masks not shared by 16-channel blocks, another geometry): the caller runs
// the two convs.
int nmk_tail_bf16(const int64_t* prm, const int64_t* prm2, const void* x, const int32_t* rowptr1, const int32_t* cin1,
                  const int32_t* kpos1, const uint16_t* val1, const float* bias1, const int32_t* rowptr2,
                  const int32_t* cin2, const int32_t* kpos2, const uint16_t* val2, const float* bias2, float* out) {
#if !NMK_BF16 || !NMK_AMX
  (void)prm, (void)prm2, (void)x, (void)rowptr1, (void)cin1, (void)kpos1, (void)val1, (void)bias1, (void)rowptr2;
  (void)cin2, (void)kpos2, (void)val2, (void)bias2, (void)out;
  return NMK_BF16 ? -4 : -3;
#else
  const Strides xs{prm[P_XSB], prm[P_XSC], prm[P_XSH]};
  if (!prm[P_IN_PADDED] || !prm[P_IN_BF16] || !nmk_amx::amx_enabled()) return -4;
  Geometry g = geometry_bf16(prm);
  if (g.Ho <= 0 || g.Wo <= 0 || xs.h != prm[P_C] * xs.c || out == nullptr) return -1;
  g.Wq = xs.c, g.plane = xs.b, g.per_b = xs.b;  // the hand-off view read in place
  const int64_t n_out = prm2[P_B] * prm2[P_O] * prm2[P_H] * prm2[P_W];
  const nmk_amx::AmxSink sink{out, {prm2[P_OSB], prm2[P_OSC], prm2[P_OSH]}, nullptr, {}, nullptr, {}, false, bias2, 1.f,
                              prm2[P_RELU] != 0, n_out >= (int64_t(1) << 20)};
  const int32_t* csr1[3] = {rowptr1, cin1, kpos1};
  const int32_t* csr2[3] = {rowptr2, cin2, kpos2};
  const int nthreads = prm[P_THREADS] > 0 ? (int)prm[P_THREADS] : 1;
  return nmk_amx::tail(prm, g, static_cast<const uint16_t*>(x), csr1, val1, bias1, prm2, csr2, val2, sink, nthreads)
             ? 0
             : -4;
#endif
}

// The bf16 sparse conv: nmk_conv2d_ex's parameters (nm_common.h) and CSR weights, with bf16
// values. x is f32 or bf16 (P_IN_BF16) with strides P_XS*; it is converted and padded into the
// bf16 workspace, unless P_IN_PADDED: then it is a bf16 hand-off view read in place (as in
// nmk_conv2d_ex, with rows of nmk_bf16_rows_read). Output: out (f32, strides P_OS*, zero border
// P_Z*) when P_OUT_F32, and/or out2 (bf16, strides P_O2S*, zero border P_Z2*) when not null.
// Returns 0; -1 on a bad geometry; -2 when the workspace needs offsets beyond 32 bits; -3 when
// this build has no bf16 kernels.
int nmk_conv2d_bf16(const int64_t* prm, const void* x, void* workspace, const int32_t* rowptr, const int32_t* cin,
                    const int32_t* kpos, const uint16_t* val, const float* bias, const float* residual,
                    float res_scale, float* out, uint16_t* out2) {
#if !NMK_BF16
  (void)prm, (void)x, (void)workspace, (void)rowptr, (void)cin, (void)kpos, (void)val, (void)bias;
  (void)residual, (void)res_scale, (void)out, (void)out2;
  return -3;
#else
  const int64_t B = prm[P_B], C = prm[P_C], O = prm[P_O], sh = prm[P_SH];
  const int R = prm[P_SHUFFLE] > 1 ? (int)prm[P_SHUFFLE] : 1;
  const int nthreads = prm[P_THREADS] > 0 ? (int)prm[P_THREADS] : 1;
  Geometry g = geometry_bf16(prm);
  const uint16_t* xp = half_input(prm, g, x, workspace, slack_bf16(g), residual, out, out2, f32_row_to_bf16);
  if (xp == nullptr) return -1;
  const Strides rs{prm[P_RSB], prm[P_RSC], prm[P_RSH]};
  const Strides os{prm[P_OSB], prm[P_OSC], prm[P_OSH]};
  const Strides o2s{prm[P_O2SB], prm[P_O2SC], prm[P_O2SH]};

  const bool res16 = prm[P_RES_F16] != 0;  // a bf16 residual (a bf16 hand-off chain)
#if NMK_AMX
  {  // masks shared by blocks of 16 output channels (and dense convs): on AMX tiles (nm_amx.h)
    const bool stream = B * O * g.Ho * g.Wo >= (int64_t(1) << 20);  // f32 and shuffled outputs (AmxSink)
    const nmk_amx::AmxSink sink{out, os, out2, o2s, residual, rs, res16, bias, res_scale, prm[P_RELU] != 0, stream};
    if (nmk_amx::conv(prm, g, xp, rowptr, cin, kpos, val, sink, nthreads)) return 0;
  }
#endif
  // Kept weights in pairs per output channel, with their workspace offsets.
  std::vector<int64_t> prow(O + 1, 0);
  for (int64_t o = 0; o < O; ++o) prow[o + 1] = prow[o] + (rowptr[o + 1] - rowptr[o] + 1) / 2;
  std::vector<Pair> pairs(prow[O]);
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t k = rowptr[o], p = prow[o]; k < rowptr[o + 1]; k += 2, ++p) {
      const bool two = k + 1 < rowptr[o + 1];
      const int64_t a = entry_offset(g, cin[k], kpos[k]);
      const int64_t b = two ? entry_offset(g, cin[k + 1], kpos[k + 1]) : a;  // zero weight: any valid offset
      if (a < 0 || b < 0) return -2;
      pairs[p] = Pair{(int32_t)a, (int32_t)b, (uint32_t)val[k] | (two ? (uint32_t)val[k + 1] << 16 : 0u)};
    }
  }

  const int nvx = g.Wo <= BV ? 1 : BNV;
  const int64_t twx = nvx * BV;
  const int64_t ctiles = (g.Wo + twx - 1) / twx;
  const int64_t per_chunk = std::max<int64_t>(1, 256 / twx);
  const int64_t chunks = (ctiles + per_chunk - 1) / per_chunk;
  const int64_t items = B * g.rtiles * chunks;
  const int64_t xstride = sh * C * g.Wq;
  const bool relu = prm[P_RELU] != 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t n = 0; n < items; ++n) {
    const int64_t b = n / (g.rtiles * chunks), rem = n % (g.rtiles * chunks);
    const int64_t rt = rem / chunks, ch = rem % chunks;
    const int64_t y0 = rt * BTR;
    const int64_t ct0 = ch * per_chunk;
    const Item it{xp + b * g.per_b + y0 * xstride, pairs.data(), prow.data(), bias, O, xstride, g.Wo, y0,
                  (int)std::min<int64_t>(BTR, g.Ho - y0), ct0, std::min<int64_t>(ctiles, ct0 + per_chunk), res16};
    float* out_b = out ? out + b * os.b : nullptr;
    uint16_t* out2_b = out2 ? out2 + b * o2s.b : nullptr;
    const char* res_b = residual ? reinterpret_cast<const char*>(residual) + b * rs.b * (res16 ? 2 : 4) : nullptr;
    if (nvx == 1)
      item_any<1>(it, relu, R, out_b, os, out2_b, o2s, res_b, rs, res_scale);
    else
      item_any<BNV>(it, relu, R, out_b, os, out2_b, o2s, res_b, rs, res_scale);
  }
  return 0;
#endif
}

}  // extern "C"
