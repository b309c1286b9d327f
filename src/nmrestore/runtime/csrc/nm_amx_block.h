// A residual block as one AMX call (nm_bf16.cpp: nmk_block_bf16): its two convs on the tile path
// of nm_amx.h, the intermediate kept in each thread's L2 (16 EDSR blocks in a chain 24 ms against
// 30 ms as 32 convs).
#pragma once
#include "nm_amx.h"

namespace nmk_amx {

#if NMK_AMX

// Rows per step of a fused block's work item: the head conv's rows of a step (2 more) stay in L2.
constexpr int64_t BLOCK_BAND = 8;
// Work items per thread. An item walks its band BLOCK_BAND rows at a time; the head conv's two rows
// below a step are the next step's two above it, copied, so only a band's edges are computed twice.
// 16 fused EDSR blocks at 2:32 (320x180, 2 threads; equal outputs): 30.7 ms as 12 items of 15 rows
// (17 head-conv rows each), 28.8 ms as 6 items of 30 in steps of 16, about 4% less in steps of 8
// (4:32: 36.1, 34.8, 3-7% less).
constexpr int64_t BLOCK_ITEMS = 3;

// A residual block fused: t = act1(conv1(x) + b1), out = act2(scale * (conv2(t) + b2) + x), both
// convs 3x3, stride 1, padding 1, C -> C, on AMX; t never leaves the thread's L2: each step of a work
// item computes its rows of t (and one row above and below) into a local buffer laid out as the
// padded input, then its output rows from it. x is the padded bf16 input (`xp`, geometry `g`), and
// the residual (`sink.res`). False when it does not qualify.
inline bool block(const int64_t* prm, const Geometry& g, const uint16_t* xp, const int32_t* const* csr1,
                  const uint16_t* val1, const float* bias1, bool relu1, const int32_t* const* csr2,
                  const uint16_t* val2, const AmxSink& sink, int nthreads) {
  const int64_t C = g.C;
  if (prm[P_SH] != 1 || prm[P_SW] != 1 || prm[P_SHUFFLE] > 1 || prm[P_KH] != 3 || prm[P_KW] != 3) return false;
  if (prm[P_PH] != 1 || prm[P_PW] != 1 || prm[P_DH] != 1 || prm[P_DW] != 1 || prm[P_O] != C || C % OB != 0 ||
      !amx_enabled())
    return false;
  const std::vector<Block> first = amx_blocks(prm, g, csr1[0], csr1[1], csr1[2], val1);
  const std::vector<Block> second = amx_blocks(prm, g, csr2[0], csr2[1], csr2[2], val2);
  if (first.empty() || second.empty()) return false;
  const int64_t xstride = C * g.Wq, lead = 32;  // t's image columns start 64-byte aligned, at `lead`
  if (g.Wq < lead + g.Wo + 1) return false;  // room for t's right zero column (a hand-off's width has it)
  const int64_t band = std::max<int64_t>(1, (g.Ho + BLOCK_ITEMS * nthreads - 1) / (BLOCK_ITEMS * nthreads));
  const int64_t bands = (g.Ho + band - 1) / band, items = g.B * bands;
  const int64_t trows = BLOCK_BAND + 2, tsize = trows * xstride + 2 * SEG;
  const AmxSink to_t{nullptr, {}, nullptr, {0, g.Wq, xstride}, nullptr, {}, false, bias1, 1.f, relu1, false};
#pragma omp parallel num_threads(nthreads)
  {
    Worker w;
    std::vector<uint16_t> scratch(NMK_AMX_ABLATE == 1 ? C * (g.Wq + SEG) : 0);
    AmxSink out = sink;
    if constexpr (NMK_AMX_ABLATE == 1) out.out = nullptr, out.out2 = scratch.data(), out.o2s = {0, g.Wq + SEG, 0};
    // zeroed once: the columns left and right of the image stay zero (conv2's padding)
    uint16_t* tbuf = static_cast<uint16_t*>(std::aligned_alloc(64, ((tsize * 2 + 63) / 64) * 64));
    std::memset(tbuf, 0, tsize * 2);
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < items; ++n) {
      const int64_t b = n / bands, y0 = (n % bands) * band, y1 = std::min(g.Ho, y0 + band);
      AmxSink sink_t = to_t;
      sink_t.out2 = tbuf + lead;
      for (int64_t ys = y0; ys < y1; ys += BLOCK_BAND) {  // t row r at buffer row r - ys + 1
        const int64_t ye = std::min(y1, ys + BLOCK_BAND);
        if (ys > y0) std::memcpy(tbuf, tbuf + BLOCK_BAND * xstride, 2 * xstride * 2);  // t rows ys - 1, ys
        for (int64_t r = ys > y0 ? ys + 1 : ys - 1; r <= ye; ++r) {
          const int64_t tr = r - ys + 1;
          if (r < 0 || r >= g.Ho) {  // conv2's zero padding rows
            std::memset(tbuf + tr * xstride, 0, xstride * 2);
            continue;
          }
          for (int64_t x0 = 0; x0 < g.Wo; x0 += SEG) {
            const int64_t ncols = std::min(SEG, g.Wo - x0);
            w.segment(xp + b * g.per_b + (NMK_AMX_ABLATE == 5 ? r % 4 : r) * xstride + x0, first, [&](float(&t)[OB][SEG], int64_t o0, bool perm) {
              relu1 ? epilogue<true, false>(t, sink_t, 0, o0, tr, x0, ncols, OB, perm)
                    : epilogue<false, false>(t, sink_t, 0, o0, tr, x0, ncols, OB, perm);
            });
          }
        }
        for (int64_t y = ys; y < ye; ++y)
          for (int64_t x0 = 0; x0 < g.Wo; x0 += SEG) {
            const int64_t ncols = std::min(SEG, g.Wo - x0);
            w.segment(tbuf + (y - ys) * xstride + lead - 1 + x0, second, [&](float(&t)[OB][SEG], int64_t o0, bool perm) {
              if constexpr (NMK_AMX_ABLATE != 2) epilogue_any(t, out, 1, b, o0, y, x0, ncols, OB, perm);
            });
          }
      }
    }
    std::free(tbuf);
    if (sink.stream) _mm_sfence();
  }
  amx_convs.fetch_add(2, std::memory_order_relaxed);
  return true;
}

#endif  // NMK_AMX

}  // namespace nmk_amx
