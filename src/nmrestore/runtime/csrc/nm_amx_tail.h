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
// step's two rows above it: copied to the top, not computed again.
#pragma once
#include "nm_amx.h"

namespace nmk_amx {

#if NMK_AMX

// Low-resolution rows per step: (TAIL_STEP + 2) * R high-resolution rows in the buffer (EDSR x2 at
// 640 columns: 16 rows of 94 KB, 1.5 MB).
constexpr int64_t TAIL_STEP = 6;

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
        for (int64_t y = R * s; y < R * (s + k); ++y)  // its rows y - 1 .. y + 1 from buffer row y - 1 - R(s - 1)
          folded_row(w, last, hbuf + (y - 1 - R * (s - 1)) * hx + lead - 1, O2, 3, 1, Wh, rows.data(), t, sink, b, y);
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
