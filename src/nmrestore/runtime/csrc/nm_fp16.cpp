// fp16 N:M-sparse Conv2d: the direct sparse convolution of nm_kernels.cpp with fp16 activations,
// weights and sums (AVX512-FP16 `vfmadd231ph`); bias, residual and ReLU in f32 where an f32 output
// or residual is involved. Compiled in only when the compiler targets AVX512-FP16 (-march=native on
// such a CPU); otherwise nmk_has_f16() is 0 and precision "fp16" runs the other kernels.
//
// Why fp16 beside bf16, measured on a Xeon with AVX512-FP16 (one 64->64 3x3 conv on 320x180, 2
// threads, per-channel masks, the same naive loop in both precisions): `vfmadd231ph` does 32 MACs where
// an f32 FMA does 16, at the same rate, and a 64-byte load brings 32 columns instead of 16, so each
// kept weight costs half the instructions: 2.5x (2:32), 2.7x (4:32), 2.8x (8:32) the f32 loop's speed.
// `vdpbf16ps` gives no such gain (its MACs per cycle equal f32 FMA's). fp16 keeps 11 significant
// bits against bf16's 8; the costs are its range (largest finite value 65504; the engine drops the
// tactic for a layer whose output is not finite) and rounding in the fp16 sums.
//
// Layout and hand-off as in nm_bf16.cpp; columns stay in order, so the epilogue needs no permute.
// What each part gave, whole EDSR-baseline x2 at 2:32 on the engine (2 threads, interleaved with the
// f32 engine, noisy machine): the naive loop 118 ms; prefetching a residual 4 channels ahead and
// streamed stores (conv with residual 4.5 -> 2.7 ms); fp16-only hand-offs along the body (engine,
// 112 ms); input blocks of 32 channels below 30% density (one conv 1.16x at 2:32, 1.27x at 4:32: the
// scattered reads of per-channel masks miss L1 in a 34 KB window, not in 17 KB); work items walking
// down bands of 4 row tiles, each prefetching into L2 the input rows the next one reads (104 -> 85 ms);
// channels sharing positions (dense convs, coarse masks) 4 at a time (the 64->3 last conv 5.7 -> 4.9
// ms); streamed stores in the fused pixel shuffle (upsampler 7.5 -> 6.7 ms). Tried: 2x128 and 4x32
// tiles (no better than 2x64: their windows leave L1), blocks of 16 input channels (slower than 32),
// cached instead of streamed stores (a block 3.9 -> 4.5 ms), and the outputs bundled into one struct
// passed to the item functions (the whole model 0.90x: they stay separate arguments).
#include "nm_f16_tiles.h"

namespace {

using namespace nmk;

#if NMK_F16

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
  // groups of output channels that keep the same positions (every channel in one; none: empty):
  // group i is channels gch[i] .. gch[i + 1] - 1, its entries gent[grp[i]] .. gent[grp[i + 1]] - 1
  const GroupEntry* gent;
  const int64_t* grp;
  const int64_t* gch;
  int64_t groups;
  const float* bias;
  int64_t O, xstride, Wo, y0;
  int nrows;
  int64_t ct0, ct1;
  bool res16;  // the residual holds fp16 (else f32)
  bool stream;
  Ahead* ahead;  // the next row tile's input rows (advanced once per channel-tile)
};

// Prefetches into L1 the residual rows (`rsize` bytes an element) of output channel o's tile, a few
// tiles before it adds them: they come from memory, scattered over the channels, which the hardware
// prefetcher does not follow.
inline void prefetch_residual(const char* res_b, Strides rs, int64_t rsize, int64_t o, int64_t y0, int64_t x0,
                              int nrows, int ncols) {
  const char* ra = res_b + (o * rs.c + y0 * rs.h + x0) * rsize;
  for (int r = 0; r < nrows; ++r)
    for (int64_t l = 0; l < ncols * rsize; l += 64) __builtin_prefetch(ra + r * rs.h * rsize + l, 0, 3);
}

// Every tile of one work item, output channel innermost (the input rows stay in L1 meanwhile).
template <bool RELU, bool RES, int NVX>
void item_groups(const Item& it, float* out_b, Strides os, uint16_t* out2_b, Strides o2s, const char* res_b,
                 Strides rs, float res_scale) {
  constexpr int TWX = NVX * HV;
  const int64_t rsize = it.res16 ? 2 : 4;
  for (int64_t ct = it.ct0; ct < it.ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, it.Wo - x0);
    for (int64_t i = 0; i < it.groups; ++i) {
      const int64_t o0 = it.gch[i], nb = it.gch[i + 1] - o0;
      Sink s[4];
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t o = o0 + j;
        s[j] = Sink{out_b ? out_b + o * os.c + it.y0 * os.h + x0 : nullptr, os.h,
                    out2_b ? out2_b + o * o2s.c + it.y0 * o2s.h + x0 : nullptr, o2s.h,
                    RES ? res_b + (o * rs.c + it.y0 * rs.h + x0) * rsize : nullptr, rs.h, it.res16, it.stream};
      }
      const GroupEntry* e = it.gent + it.grp[i];
      const int64_t n = it.grp[i + 1] - it.grp[i];
      const float* b = it.bias ? it.bias + o0 : nullptr;
      const uint16_t* xh = it.xrow + x0;
      switch (nb) {
        case 1: tile_group<RELU, RES, NVX, 1>(xh, e, n, it.xstride, b, s, res_scale, it.nrows, ncols); break;
        case 2: tile_group<RELU, RES, NVX, 2>(xh, e, n, it.xstride, b, s, res_scale, it.nrows, ncols); break;
        case 3: tile_group<RELU, RES, NVX, 3>(xh, e, n, it.xstride, b, s, res_scale, it.nrows, ncols); break;
        default: tile_group<RELU, RES, NVX, 4>(xh, e, n, it.xstride, b, s, res_scale, it.nrows, ncols); break;
      }
      for (int64_t j = 0; j < nb; ++j) it.ahead->advance();
    }
  }
}

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
      if (RES && o + RES_AHEAD < it.O) prefetch_residual(res_b, rs, rsize, o + RES_AHEAD, it.y0, x0, it.nrows, ncols);
      const Sink s{out_b ? out_b + o * os.c + it.y0 * os.h + x0 : nullptr, os.h,
                   out2_b ? out2_b + o * o2s.c + it.y0 * o2s.h + x0 : nullptr, o2s.h,
                   RES ? res_b + (o * rs.c + it.y0 * rs.h + x0) * rsize : nullptr, rs.h, it.res16, it.stream};
      tile<RELU, RES, NVX>(it.xrow + x0, it.entries + k0, it.rp[o + 1] - k0, it.xstride,
                           it.bias ? it.bias[o] : 0.f, s, res_scale, it.nrows, ncols);
      it.ahead->advance();
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
          if (RES && last && o + RES_AHEAD < it.O)
            prefetch_residual(res_b, rs, rsize, o + RES_AHEAD, it.y0, x0, it.nrows, ncols);
          const Sink s{out_b ? out_b + o * os.c + it.y0 * os.h + x0 : nullptr, os.h,
                       out2_b ? out2_b + o * o2s.c + it.y0 * o2s.h + x0 : nullptr, o2s.h,
                       RES ? res_b + (o * rs.c + it.y0 * rs.h + x0) * rsize : nullptr, rs.h, it.res16, it.stream};
          tile<RELU, RES, NVX>(it.xrow + x0, it.entries + rp[o], rp[o + 1] - rp[o], it.xstride,
                               it.bias ? it.bias[o] : 0.f, s, res_scale, it.nrows, ncols, g ? part[j] : nullptr,
                               last ? nullptr : part[j]);
          it.ahead->advance();
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
        it.ahead->advance();
      }
      const int64_t c = og / (R * R), i = (og / R) % R;
      for (int r = 0; r < it.nrows; ++r) {
        const int64_t hr = (it.y0 + r) * R + i;
        float* df = out_b ? out_b + c * os.c + hr * os.h + x0 * R : nullptr;
        uint16_t* dh = out2_b ? out2_b + c * o2s.c + hr * o2s.h + x0 * R : nullptr;
        const float* rows[4] = {tmp[0][r], tmp[1][r], tmp[2][r], tmp[3][r]};
        shuffle_row(rows, R, ncols, df, dh, it.stream,
                    [](__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); },
                    [](float v) { return (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); });
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
#define NMK_ITEM(A, B)                                                                         \
  (it.groups > 0     ? item_groups<A, B, NVX>(it, out_b, os, out2_b, o2s, res_b, rs, res_scale) \
   : it.blocks > 1 ? item_split<A, B, NVX>(it, out_b, os, out2_b, o2s, res_b, rs, res_scale)  \
                     : item<A, B, NVX>(it, out_b, os, out2_b, o2s, res_b, rs, res_scale))
  if (relu && res_b) NMK_ITEM(true, true);
  else if (relu) NMK_ITEM(true, false);
  else if (res_b) NMK_ITEM(false, true);
  else NMK_ITEM(false, false);
#undef NMK_ITEM
  if (it.stream) _mm_sfence();  // the streamed stores are visible before the parallel region ends
}

// Whether every group of 4 consecutive output channels (the last may be smaller) keeps the same
// positions, in the same order.
bool shared_groups(const int32_t* rowptr, const int32_t* cin, const int32_t* kpos, int64_t O) {
  if (O < 2) return false;
  for (int64_t o0 = 0; o0 < O; o0 += 4)
    for (int64_t o = o0 + 1; o < std::min<int64_t>(O, o0 + 4); ++o) {
      const int64_t n = rowptr[o0 + 1] - rowptr[o0];
      if (rowptr[o + 1] - rowptr[o] != n) return false;
      for (int64_t k = 0; k < n; ++k)
        if (cin[rowptr[o] + k] != cin[rowptr[o0] + k] || kpos[rowptr[o] + k] != kpos[rowptr[o0] + k]) return false;
    }
  return true;
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

NMK_HALF_ENTRY_POINTS(f16, NMK_F16, HTR, HTW, HV, geometry_f16, slack_f16)

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
  const int64_t B = prm[P_B], C = prm[P_C], O = prm[P_O], sh = prm[P_SH];
  const int R = prm[P_SHUFFLE] > 1 ? (int)prm[P_SHUFFLE] : 1;
  const int nthreads = prm[P_THREADS] > 0 ? (int)prm[P_THREADS] : 1;
  Geometry g = geometry_f16(prm);
  const uint16_t* xp = half_input(prm, g, x, workspace, slack_f16(g), residual, out, out2, f32_row_to_f16);
  if (xp == nullptr) return -1;
  const Strides rs{prm[P_RSB], prm[P_RSC], prm[P_RSH]};
  const Strides os{prm[P_OSB], prm[P_OSC], prm[P_OSH]};
  const Strides o2s{prm[P_O2SB], prm[P_O2SC], prm[P_O2SH]};

  // Channels that keep the same positions, in groups of up to 4 (not with a fused shuffle).
  std::vector<int64_t> grp{0}, gch{0};
  std::vector<GroupEntry> gent;
  if (R == 1 && shared_groups(rowptr, cin, kpos, O)) {
    for (int64_t o0 = 0; o0 < O; o0 += 4) {
      const int64_t nb = std::min<int64_t>(4, O - o0);
      for (int64_t k = 0; k < rowptr[o0 + 1] - rowptr[o0]; ++k) {
        const int64_t off = entry_offset(g, cin[rowptr[o0] + k], kpos[rowptr[o0] + k]);
        if (off < 0) return -2;
        GroupEntry e{(int32_t)off, {0, 0, 0, 0}, {0, 0}};
        for (int64_t j = 0; j < nb; ++j) e.w[j] = val[rowptr[o0 + j] + k];
        gent.push_back(e);
      }
      std::sort(gent.begin() + grp.back(), gent.end(),
                [](const GroupEntry& a, const GroupEntry& b) { return a.off < b.off; });
      grp.push_back((int64_t)gent.size());
      gch.push_back(o0 + nb);
    }
  }
  const int64_t groups = (int64_t)grp.size() - 1;

  // Kept weights grouped by (input block, output channel), each group in address order.
  const int64_t blocks = groups > 0 ? 1 : split_blocks(C, O, rowptr[O], prm[P_KH] * prm[P_KW], R);
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
  const int64_t per_chunk = std::max<int64_t>(1, 128 / twx);
  const int64_t chunks = (ctiles + per_chunk - 1) / per_chunk;
  // Work items: (image, band of up to BAND row tiles, chunk of columns), walking down the band, with
  // at least 8 items per thread.
  const int64_t band = std::max<int64_t>(1, std::min<int64_t>(BAND, B * g.rtiles * chunks / (8 * nthreads)));
  const int64_t bands = (g.rtiles + band - 1) / band;
  const int64_t items = B * bands * chunks;
  const int64_t xstride = sh * C * g.Wq;
  const int64_t KH = prm[P_KH], dh = prm[P_DH];
  const bool relu = prm[P_RELU] != 0;
  const bool stream = B * O * g.Ho * g.Wo >= (int64_t(1) << 20);
  const bool res16 = prm[P_RES_F16] != 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t n = 0; n < items; ++n) {
    const int64_t b = n / (bands * chunks), rem = n % (bands * chunks);
    const int64_t bd = rem / chunks, ch = rem % chunks;
    const int64_t ct0 = ch * per_chunk, ct1 = std::min<int64_t>(ctiles, ct0 + per_chunk);
    const int64_t cols = std::min<int64_t>((ct1 - ct0) * twx, g.Wo - ct0 * twx) + (prm[P_KW] - 1) * prm[P_DW];
    float* out_b = out ? out + b * os.b : nullptr;
    uint16_t* out2_b = out2 ? out2 + b * o2s.b : nullptr;
    const char* res_b = residual ? reinterpret_cast<const char*>(residual) + b * rs.b * (res16 ? 2 : 4) : nullptr;
    for (int64_t rt = bd * band; rt < std::min(g.rtiles, (bd + 1) * band); ++rt) {
      const int64_t y0 = rt * HTR;
      // the rows the next row tile reads and this one does not
      const int64_t first = std::max((y0 + HTR - 1) * sh + (KH - 1) * dh + 1, (y0 + HTR) * sh);
      const int64_t last = (y0 + 2 * HTR - 1) * sh + (KH - 1) * dh;
      const int64_t channel_tiles = (ct1 - ct0) * O * (R > 1 ? 1 : blocks);
      Ahead ahead(reinterpret_cast<const char*>(xp + b * g.per_b + first * C * g.Wq + ct0 * twx),
                  rt + 1 < g.rtiles ? last - first + 1 : 0, C * g.Wq * 2, C, g.Wq * 2, cols * 2, channel_tiles);
      const Item it{xp + b * g.per_b + y0 * xstride, entries.data(), rp.data(), blocks, gent.data(), grp.data(),
                    gch.data(), groups, bias, O, xstride, g.Wo, y0, (int)std::min<int64_t>(HTR, g.Ho - y0), ct0,
                    ct1, res16, stream, &ahead};
      if (nvx == 1)
        item_any<1>(it, relu, R, out_b, os, out2_b, o2s, res_b, rs, res_scale);
      else
        item_any<HNV>(it, relu, R, out_b, os, out2_b, o2s, res_b, rs, res_scale);
    }
  }
  return 0;
#endif
}

}  // extern "C"
