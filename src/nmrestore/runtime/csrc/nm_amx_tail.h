// EDSR's and RCAN's tail as one AMX call (nm_bf16.cpp: nmk_tail_bf16): the upsampler's last conv
// with its fused pixel shuffle of factor R, then the dense last conv (3x3, padding 1, few outputs:
// folded_conv's form). The high-resolution activation between them (EDSR-baseline x2 at 320x180:
// 64 x 360 x 640 bf16, 29 MB) never leaves the thread's L2: apart, the upsampler streams it out and
// the last conv reads it back from memory.
//
// Each work item takes a band of low-resolution rows and walks it TAIL_STEP rows at a time: the
// upsampler writes the R high-resolution rows of each low-resolution row into a buffer laid out as
// a padded input (rows of C channels of `wq` columns, zero columns left and right), with one
// low-resolution row above and below (zero rows outside the image: the last conv's padding); the
// last conv then computes its output rows from the buffer. The two rows below a step are the next
// step's two rows above it: copied to the top, not computed again. At x2 the buffer holds channel
// pairs interleaved and the last conv reads its B tiles straight from it (pairs_row): the tail of
// EDSR-baseline x2 at 2:32 (block-shared masks) 5.7 ms against 7.7 ms with the gathered, folded form,
// the whole forward 1.05x (4:32: 1.03x).
#pragma once
#include "nm_amx.h"

namespace nmk_amx {

#if NMK_AMX

// Low-resolution rows per step: (TAIL_STEP + 2) * R high-resolution rows in the buffer (EDSR x2 at
// 640 columns: 16 rows of 94 KB, 1.5 MB).
constexpr int64_t TAIL_STEP = 6;

// With R = 2 the high-resolution buffer holds channel pairs interleaved, as AMX's B operand wants
// them: plane p of a buffer row holds channels 2p and 2p + 1, pixel by pixel (`2 * wq` elements).
// The last conv then loads its B tiles straight from the buffer (16 channel pairs at one row offset
// dy, 16 pixels) instead of gathering them. Off: -DNMK_TAIL_PAIRS=0 (the folded, gathered form).
#ifndef NMK_TAIL_PAIRS
#define NMK_TAIL_PAIRS 1
#endif
// Image column 0 of a plane: the last conv's reads (from column -1) start 64-byte aligned, so each of a
// B tile's 16 rows is one cache line, not two.
constexpr int64_t PAIRS_LEAD = 17;

// The last conv's A tiles for the pair layout: step (dy, g) covers channel pairs 16g .. 16g + 15 at
// row offset dy; row o * 3 + dx of A, column 2r + e, holds W[o][2(16g + r) + e][dy][dx].
inline std::vector<uint16_t> pack_pairs_last(const int32_t* rowptr, const int32_t* cin, const int32_t* kpos,
                                             const uint16_t* val, int64_t O, int64_t C) {
  const int64_t groups = C / 32;
  std::vector<uint16_t> a(3 * groups * OB * 32, 0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = rowptr[o]; k < rowptr[o + 1]; ++k) {
      const int64_t dy = kpos[k] / 3, dx = kpos[k] % 3, c = cin[k], step = dy * groups + c / 32;
      a[step * OB * 32 + (o * 3 + dx) * 32 + c % 32] = val[k];
    }
  return a;
}

// The upsampler's epilogue into the pair layout (R = 2, whole 16-pixel groups): bias and ReLU, then
// channels c, c + 1 of high-resolution row 2y + i interleaved per pixel, pixel 2x + j from output
// channel 4c + 2i + j (pixel_shuffle's order).
inline void epilogue_pairs(float (&t)[OB][SEG], const AmxSink& s, int64_t o0, int64_t y, int64_t x0, int64_t ncols,
                           bool permuted, uint16_t* hbuf, int64_t hx, int64_t wq, int64_t lead) {
  bias_relu_in_place(t, s, o0, OB, permuted);
  // (a, b) bf16 pairs of 16 pixels from cvtne2ps_pbh(b, a)'s halves, then pixels j = 0, 1 interleaved
  const __m512i pair = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                        21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);  // 0, 16, 1, 17, ...
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const int64_t cb = o0 / 4;  // the block's first high-resolution channel (even)
  for (int64_t p = 0; p < 2; ++p)
    for (int64_t i = 0; i < 2; ++i) {
      const float* a0 = t[(2 * p) * 4 + 2 * i];
      const float* a1 = a0 + SEG;
      const float* b0 = t[(2 * p + 1) * 4 + 2 * i];
      const float* b1 = b0 + SEG;
      uint16_t* dst = hbuf + (2 * y + i) * hx + (cb / 2 + p) * 2 * wq + 2 * (lead + 2 * x0);
      for (int64_t l = 0; l < ncols; l += 16) {
        const __m512i w0 = _mm512_permutexvar_epi16(
            pair, (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(b0 + l), _mm512_load_ps(a0 + l)));
        const __m512i w1 = _mm512_permutexvar_epi16(
            pair, (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(b1 + l), _mm512_load_ps(a1 + l)));
        _mm512_storeu_si512(dst + 4 * l, _mm512_permutex2var_epi32(w0, lo, w1));
        _mm512_storeu_si512(dst + 4 * l + 32, _mm512_permutex2var_epi32(w0, hi, w1));
      }
    }
}

// One output row of the last conv from the pair layout: `rows3[dy]` its input rows y - 1 + dy (at
// column -1 of the image); the (o, dx) sums then added up as folded_row does.
inline void pairs_row(const std::vector<uint16_t>& a, int64_t groups, const uint16_t* const* rows3, int64_t wq,
                      int64_t O, int64_t Wo, float* rows, float (&t)[OB][SEG], const AmxSink& sink, int64_t b,
                      int64_t y) {
  const int64_t span = Wo + 2, width = folded_width(Wo, 3, 1), stride = 2 * wq * 2;  // bytes between planes
  for (int64_t q0 = 0; q0 < span; q0 += SEG) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t dy = 0; dy < 3; ++dy)
      for (int64_t gidx = 0; gidx < groups; ++gidx) {
        const uint16_t* base = rows3[dy] + gidx * 16 * 2 * wq + 2 * q0;
        _tile_loadd(4, a.data() + (dy * groups + gidx) * OB * 32, 64);
        _tile_loadd(5, base, stride);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, base + 32, stride);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, base + 64, stride);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, base + 96, stride);
        _tile_dpbf16ps(3, 4, 6);
      }
    _tile_stored(0, &t[0][0], SEG * 4);
    _tile_stored(1, &t[0][16], SEG * 4);
    _tile_stored(2, &t[0][32], SEG * 4);
    _tile_stored(3, &t[0][48], SEG * 4);
    for (int64_t j = 0; j < O * 3; ++j) std::memcpy(&rows[j * width + q0], t[j], SEG * 4);
  }
  fold_columns(rows, O, 3, 1, Wo, t, sink, b, y);
}

// prm / g: the upsampler conv (stride 1, shuffle R > 1) on the padded bf16 input xp; prm2: the last
// conv's geometry (its P_C, P_H, P_W the shuffled output's). `sink` takes the last conv's output.
// False when they do not qualify.
inline bool tail(const int64_t* prm, const Geometry& g, const uint16_t* xp, const int32_t* const* csr1,
                 const uint16_t* val1, const float* bias1, const int64_t* prm2, const int32_t* const* csr2,
                 const uint16_t* val2, const AmxSink& sink, int nthreads) {
  const int R = prm[P_SHUFFLE] > 1 ? (int)prm[P_SHUFFLE] : 1;
  if (R < 2 || OB % R != 0 || prm[P_SH] != 1 || prm[P_SW] != 1 || !amx_enabled()) return false;
  const int64_t O1 = prm[P_O], C2 = O1 / (R * R), Hh = g.Ho * R, Wh = g.Wo * R, O2 = prm2[P_O];
  if (O1 % (R * R) != 0 || prm2[P_C] != C2 || prm2[P_H] != Hh || prm2[P_W] != Wh || prm2[P_KH] != 3 ||
      prm2[P_KW] != 3 || prm2[P_SH] != 1 || prm2[P_SW] != 1 || prm2[P_PH] != 1 || prm2[P_PW] != 1 ||
      prm2[P_DH] != 1 || prm2[P_DW] != 1)
    return false;
  const std::vector<Block> up = amx_blocks(prm, g, csr1[0], csr1[1], csr1[2], val1);
  if (up.empty()) return false;
  // the buffer: image column 0 at `lead` (64-byte aligned), the last segment's reads inside a row
  const int64_t lead = 32, width = folded_width(Wh, 3, 1), wq = (lead - 1 + width + 31) / 32 * 32;
  Geometry gh = g;  // what folded_block and entry_offset read of the buffer
  gh.C = C2, gh.KH = 3, gh.KW = 3, gh.sh = gh.sw = 1, gh.dh = gh.dw = 1, gh.ph = gh.pw = 1;
  gh.Wq = wq, gh.plane = 0, gh.Ho = Hh, gh.Wo = Wh;
  std::vector<Block> last(1);
  if (!folded_block(prm2, gh, csr2[0], csr2[1], csr2[2], val2, last[0])) return false;
  // the pair layout: x2, whole 16-pixel groups, whole groups of 16 channel pairs
  const bool pairs = NMK_TAIL_PAIRS && R == 2 && g.Wo % 16 == 0 && C2 % 32 == 0 && O1 % OB == 0;
  const std::vector<uint16_t> a2 = pairs ? pack_pairs_last(csr2[0], csr2[1], csr2[2], val2, O2, C2) : std::vector<uint16_t>();
  const int64_t hx = C2 * wq, slot = R * hx, bsize = (TAIL_STEP + 2) * slot + 2 * SEG;
  const int64_t per = std::max<int64_t>(1, (g.Ho + 2 * nthreads - 1) / (2 * nthreads));  // 2 bands a thread
  const int64_t bands = (g.Ho + per - 1) / per, items = g.B * bands, xstride = g.C * g.Wq;
  const AmxSink to_h{nullptr, {}, nullptr, {0, wq, hx}, nullptr, {}, false, bias1, 1.f, prm[P_RELU] != 0, false};
#pragma omp parallel num_threads(nthreads)
  {
    Worker w;
    uint16_t* hbuf = static_cast<uint16_t*>(std::aligned_alloc(64, ((bsize * 2 + 63) / 64) * 64));
    std::memset(hbuf, 0, bsize * 2);  // the columns left and right of the image stay zero
    std::vector<float> rows(O2 * 3 * width + SEG);
    alignas(64) float t[OB][SEG];
    AmxSink to_buf = to_h;
    to_buf.out2 = hbuf + lead;
    auto upsample = [&](int64_t b, int64_t r, int64_t i) {  // low-resolution row r into slot i
      if (r < 0 || r >= g.Ho) {
        std::memset(hbuf + i * slot, 0, slot * 2);
        return;
      }
      for (int64_t x0 = 0; x0 < g.Wo; x0 += SEG) {
        const int64_t ncols = std::min(SEG, g.Wo - x0);
        w.segment(xp + b * g.per_b + r * xstride + x0, up, [&](float(&s)[OB][SEG], int64_t o0, bool perm) {
          if (pairs)
            epilogue_pairs(s, to_h, o0, i, x0, ncols, perm, hbuf, hx, wq, PAIRS_LEAD);
          else
            epilogue_shuffle(s, to_buf, R, 0, o0, i, x0, ncols, std::min(OB, O1 - o0), perm);
        });
      }
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < items; ++n) {
      const int64_t b = n / bands, a = (n % bands) * per, e = std::min(g.Ho, a + per);
      for (int64_t s = a; s < e; s += TAIL_STEP) {  // slot i holds low-resolution row s - 1 + i
        const int64_t k = std::min(TAIL_STEP, e - s);
        if (s > a) std::memcpy(hbuf, hbuf + TAIL_STEP * slot, 2 * slot * 2);  // rows s - 1 and s
        for (int64_t i = s > a ? 2 : 0; i < k + 2; ++i) upsample(b, s - 1 + i, i);
        for (int64_t y = R * s; y < R * (s + k); ++y) {  // its rows y - 1 .. y + 1 from buffer row y - 1 - R(s - 1)
          const uint16_t* top = hbuf + (y - 1 - R * (s - 1)) * hx;
          if (pairs) {
            const int64_t at = 2 * (PAIRS_LEAD - 1);
            const uint16_t* rows3[3] = {top + at, top + hx + at, top + 2 * hx + at};
            pairs_row(a2, C2 / 32, rows3, wq, O2, Wh, rows.data(), t, sink, b, y);
          } else {
            folded_row(w, last, top + lead - 1, O2, 3, 1, Wh, rows.data(), t, sink, b, y);
          }
        }
      }
    }
    std::free(hbuf);
    if (sink.stream) _mm_sfence();
  }
  amx_convs.fetch_add(2, std::memory_order_relaxed);
  return true;
}

#endif  // NMK_AMX

}  // namespace nmk_amx
