// N:M-sparse Conv2d / Linear for ordinary CPUs: direct sparse convolution from a compressed
// (CSR-per-output-channel) form of the kept weights. Compiled at first use by
// nmrestore.runtime.kernel with the machine's own compiler (-O3 -march=native -fopenmp) and
// called through ctypes: a plain C ABI, no Python or torch headers, so it builds in about a second.
//
// Algorithm (conv): out[b, o, y, x] = bias[o] + sum_k val[k] * in_pad[b, c_k, y*sh + kh_k*dh, x*sw + kw_k*dw]
// over the kept weights k of output channel o. The input is padded once per call into a
// workspace laid out (phase, row, channel, column): for stride sw > 1 the columns are split into
// sw phases, so every load of a tile row is contiguous whatever the stride. An output tile is
// TR rows x NV vectors kept in registers; each kept weight costs one broadcast and TR*NV fused
// multiply-adds with contiguous loads. Work items are (image, row tile, 128-column chunk); inside
// an item, output channels are the innermost loop, so all of them reuse the same few input rows
// while they are in L1/L2. Narrow outputs (small patches) get narrower tiles. The epilogue can
// add a residual (x + s * conv) and apply a ReLU while the tile is still in registers.
//
// Measured against the alternatives (EDSR 64->64 3x3 conv on 320x180, 2 threads, interleaved with
// F.conv2d in one process): 4x64 / 2x64 / 1x64 / 2x32 / 4x32 / 6x32 tiles were tried; 2 rows x 64
// columns (AVX-512) was best at 4:32 and 8:32 and close to best at 2:32. Also tried on that conv
// (8:32 / 4:32 / 2:32, 2 threads, idle machine): per column tile, the input rows copied once per
// kernel column shift so every load is aligned (1.12x / 1.01x / 0.87x; with all loads aligned and no
// copy, the results wrong, the bound is 1.49x / 1.32x / 1.14x); rows padded off 4 KiB strides, and
// odd channels walking their weights backwards (no change). None is worth its code. Input channels
// in blocks with the partial sums kept aside gave <= 1.11x / 1.11x / 0.90x on that conv when first
// tried; with the prefetch and banded items below, blocks of 32 input channels and the partial sums
// of all 64 output channels make the whole model 1.11x / 1.06x faster at 4:32 / 2:32, and are kept
// below 20% density (see Split in nm_weights.h, conv_item_split).
// What is kept, at 20% density and above (nm_weights.h): output channels run in pairs that load the
// input positions both keep once (see Paired), and a tile runs its weights kernel column by kernel
// column with aligned loads only, shifting each column's sum into place once (see Grouped): that
// removes the cache-line-straddling loads without copying the input. Tried after the pairs: pairs
// matched by largest overlap instead of neighbours (trained 16:32 masks share 27% of positions
// against 25%: not worth it); channels in threes on dense convs (0.89-1.02x on the 64->3 last conv, which is bound by memory, not loads);
// work items walking down 4-16 row tiles so shared input rows stay in L2 (1.10-1.17x on the 64->3
// last conv, which is under 3% of a forward; 0.95-1.05x, noise, on the 64->64 and 64->256 convs, and
// too few items for two threads on small inputs; kept later, up to 4 row tiles and at least 8 items
// per thread, together with NextRows); software prefetch of the entries 4-16 ahead (none);
// prefetch of the next column tile's input rows, spread over the current tile's channels, into L1,
// L2 or L3 (whole EDSR x2, 2:32 and 4:32 per-channel, near-quiet machine: 0.93-0.95x). Kept: the
// next row tile's new input rows prefetched into L2 (see NextRows); its residual rows prefetched
// the same way on top of them gave 0.98-0.99x while a prefetch cost two divisions, before the split
// by input channels, and are kept since (see NextRows). Also tried on the 64->3 last conv (dense, O < 8):
// NextRows there (with the counted prefetch: 1.02x on the conv, no gain on the model); its 3 channels
// as one block like the coarse blocks below (0.48x without NextRows, 0.76x with: its one pass over
// the input window waits on memory, where per-channel passes find the window in cache); without
// pairs and kernel-column groups, split by input channels (0.95x); 2 MiB pages for the engine's
// buffers (THP, none).
// Masks shared by blocks of output channels (out_block a multiple of 4: "coarse" N:M) run in
// blocks of 4 channels (see Blocked): a 2x32 sub-tile of 4 channels is 16 accumulators, so every
// input vector loaded feeds 4 FMAs instead of one. On the EDSR 64->64 conv (320x180, hand-off input,
// 2 threads, interleaved, slowed machine) against per-channel masks of the same N:M: 1.93x at 4:32,
// 1.32x at 2:32; blocks of 8 x 2x16 gave 1.53x / 1.18x, 2 x 2x64 1.64x / 1.31x, 4 x 2x16 1.65x / 1.08x.
// OpenMP: torch's wheel ships libgomp.so.1 and loads it first, so this library's parallel regions
// run on the same runtime and pool as torch's own ops (no second pool spinning against it).
#include "nm_tiles.h"

namespace {

using nmk::Geometry;
using nmk::Strides;
using namespace nmk;  // Param indices

inline Geometry geometry(int64_t B, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t sh, int64_t sw,
                         int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  return nmk::geometry(B, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, VW, TR);
}

// Slack after the last image: a tile's last vector may read up to TW + Wq floats past a row.
inline int64_t slack(const Geometry& g) { return TW + g.Wq + 2 * VW; }

// Prefetches into L2, a share after every channel-tile of a row tile, the input rows that the next
// row tile over the same columns reads and this one does not (2 of its 4 rows for a 3x3 conv), so
// their loads from memory overlap this row tile's FMAs; a work item walks down several row tiles
// (nmk_conv2d_ex), so the next one runs on this core. Without it a row tile's new rows came from
// memory while the FMAs waited (one conv's input, written by the conv before with streamed stores,
// is not in any cache). The last row tile prefetches rows past the image (prefetches never fault).
// Whole EDSR x2, per-channel masks, 2 threads, interleaved, near-quiet machine: 1.075x at 2:32,
// 1.04x at 4:32 (prefetching into L1: 1.07x / 1.02x; the next column tile's rows instead:
// 0.93-0.95x). The same for the rows of a residual the next row tile adds (residual()): on top of
// the input rows and the split by input channels, 1.04-1.07x at 4:32 and 1.04-1.08x at 2:32.
class NextRows {
 public:
  // rows [first, first + count) from `base`, each `channels` segments of `cols` floats, `wq` apart;
  // spread over `channel_tiles` calls of advance(1)
  NextRows(const float* base, int64_t row, int64_t wq, int64_t channels, int64_t count, int64_t cols,
           int64_t channel_tiles)
      : base_(base),
        row_(row),
        wq_(wq),
        channels_(channels),
        lines_((cols + VW - 1) / VW),
        total_(count * channels * lines_),
        per_tile_((total_ + channel_tiles - 1) / std::max<int64_t>(1, channel_tiles)) {}

  // The input rows of the next row tile (L.ahead), columns [x0, x0 + cols).
  static NextRows input(const float* xrow, const Layer& L, int64_t x0, int64_t cols, int64_t channel_tiles) {
    return NextRows(xrow + L.ahead.first * L.ahead.row + x0, L.ahead.row, L.ahead.wq, L.ahead.channels,
                    L.ahead.count, cols, channel_tiles);
  }

  // The residual rows the next row tile (from y0 + TR) adds, O channels, columns [x0, x0 + cols); none
  // without a residual.
  static NextRows residual(const float* res_b, Strides rs, int64_t O, int64_t y0, int64_t x0, int64_t cols,
                           int64_t channel_tiles) {
    if (res_b == nullptr) return NextRows(nullptr, 0, 0, O, 0, cols, channel_tiles);
    return NextRows(res_b + (y0 + TR) * rs.h + x0, rs.h, rs.c, O, TR, cols, channel_tiles);
  }

  // After `tiles` more channel-tiles: their share of the prefetches. Line, channel and row are
  // counted, not divided out of one index: two 64-bit divisions per prefetch made the whole EDSR x2
  // 1.02x (4:32) and 1.02-1.04x (2:32) slower (interleaved, near-quiet machine).
  void advance(int tiles) {
    for (const int64_t end = std::min(total_, done_ + per_tile_ * tiles); done_ < end; ++done_) {
      __builtin_prefetch(at_ + line_ * VW, 0, 2);
      if (++line_ == lines_) {
        line_ = 0;
        if (++c_ == channels_) {
          c_ = 0;
          ++r_;
        }
        at_ = base_ + r_ * row_ + c_ * wq_;
      }
    }
  }

 private:
  const float* base_;
  const float* at_ = base_;
  int64_t row_, wq_, channels_, lines_, total_, per_tile_, done_ = 0, line_ = 0, c_ = 0, r_ = 0;
};

// conv_item for a layer split by input channels (see Split): per column tile, the output channels
// in chunks of SPLIT_OUTPUTS, each chunk block by block, its partial sums kept aside in part.
template <bool RELU, bool RES, int NVX>
void conv_item_split(const float* xrow, const Layer& L, const float* bias, int64_t O, int64_t rstride, float* out_b,
                     Strides os, const float* res_b, Strides rs, float res_scale, int64_t Wo, int64_t y0, int nrows,
                     int64_t ct0, int64_t ct1, bool stream) {
  constexpr int TWX = NVX * VW;
  alignas(64) vf part[SPLIT_OUTPUTS][TR][NVX];  // 32 KB at 2x64 tiles
  const Split& S = *L.split;
  const int64_t blocks = S.blocks;
  const Entry* ent = S.ent.data();
  const int64_t cols = std::min<int64_t>((ct1 - ct0) * TWX, Wo - ct0 * TWX), tiles = (ct1 - ct0) * O * blocks;
  NextRows ahead = NextRows::input(xrow, L, ct0 * TWX, cols, tiles);
  NextRows res_ahead = NextRows::residual(res_b, rs, O, y0, ct0 * TWX, cols, tiles);
  for (int64_t ct = ct0; ct < ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, Wo - x0);
    const float* xb = xrow + x0;
    for (int64_t o0 = 0; o0 < O; o0 += SPLIT_OUTPUTS) {
      const int64_t oc = std::min<int64_t>(SPLIT_OUTPUTS, O - o0);
      for (int64_t g = 0; g < blocks; ++g) {
        const int64_t* rp = S.rp.data() + g * (O + 1);
        for (int64_t j = 0; j < oc; ++j) {
          const int64_t o = o0 + j;
          vf acc[TR][NVX];
          if (g == 0)
            init_tile<NVX>(acc, bias ? bias[o] : 0.f);
          else
            copy_tile<NVX>(acc, part[j]);
          accumulate<NVX>(acc, xb, ent + rp[o], rp[o + 1] - rp[o], rstride);
          if (g + 1 == blocks)
            store_tile<RELU, RES, NVX>(acc, out_b + o * os.c + y0 * os.h + x0, os.h,
                                       RES ? res_b + o * rs.c + y0 * rs.h + x0 : nullptr, rs.h, res_scale, nrows,
                                       ncols, stream);
          else
            copy_tile<NVX>(part[j], acc);
          ahead.advance(1);
          if (RES) res_ahead.advance(1);
        }
      }
    }
  }
  if (stream) stream_fence();
}

// Every tile of one work item (image b, output rows y0.., column tiles [ct0, ct1) of width NVX*VW),
// output channel innermost: a tile's input rows stay in L1/L2 while all output channels use them.
// stream: whole aligned output vectors bypass the caches (an output larger than they are).
template <bool RELU, bool RES, int NVX>
void conv_item(const float* xrow, const Layer& L, const float* bias, int64_t O, int64_t rstride, float* out_b,
               Strides os, const float* res_b, Strides rs, float res_scale, int64_t Wo, int64_t y0, int nrows,
               int64_t ct0, int64_t ct1, bool stream) {
  if (L.split) {
    conv_item_split<RELU, RES, NVX>(xrow, L, bias, O, rstride, out_b, os, res_b, rs, res_scale, Wo, y0, nrows, ct0,
                                    ct1, stream);
    return;
  }
  constexpr int TWX = NVX * VW;
  const int64_t cols = std::min<int64_t>((ct1 - ct0) * TWX, Wo - ct0 * TWX), tiles = (ct1 - ct0) * O;
  NextRows ahead = NextRows::input(xrow, L, ct0 * TWX, cols, tiles);
  NextRows res_ahead = NextRows::residual(res_b, rs, O, y0, ct0 * TWX, cols, tiles);
  for (int64_t ct = ct0; ct < ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, Wo - x0);
    auto out_at = [&](int64_t o) { return out_b + o * os.c + y0 * os.h + x0; };
    auto res_at = [&](int64_t o) { return RES ? res_b + o * rs.c + y0 * rs.h + x0 : nullptr; };
    for (int64_t o = 0; o < O;) {
      const int done = channel_tiles<RELU, RES, NVX>(xrow + x0, L, o, O, rstride, bias, out_at, os.h, res_at, rs.h,
                                                     res_scale, nrows, ncols, stream);
      o += done;
      ahead.advance(done);
      if (RES) res_ahead.advance(done);
    }
  }
  if (stream) stream_fence();
}

// The same with a fused pixel shuffle of factor R: conv channel o = (c * R + i) * R + j at (y, x)
// goes to out[c, y * R + i, x * R + j]. The R channels of one (c, i) are computed into a small
// buffer and interleaved into HR rows, so PyTorch's separate (slow, strided) shuffle pass and the
// LR-resolution output never exist. At x2 the HR rows are written with non-temporal stores, which
// skip reading each output line into the cache before overwriting it: on the EDSR x2 upsampler
// (64->256 + shuffle, 320x180, 2 threads) 1.7x faster at 2:32 per-channel and 2.8x with masks
// shared by blocks of channels, where ordinary stores made the write half or more of the conv.
template <bool RELU, int NVX>
void conv_item_shuffle(const float* xrow, const Layer& L, const float* bias, int64_t O, int64_t rstride,
                       float* out_b, Strides os, int R, int64_t Wo, int64_t y0, int nrows, int64_t ct0, int64_t ct1,
                       bool stream) {
  constexpr int TWX = NVX * VW;
  alignas(64) float tmp[16][TR][TWX];  // the R * R channels of one shuffled channel c, R <= 4
  const int RR = R * R;
  NextRows ahead = NextRows::input(xrow, L, ct0 * TWX, std::min<int64_t>((ct1 - ct0) * TWX, Wo - ct0 * TWX),
                                   (ct1 - ct0) * O);
  for (int64_t ct = ct0; ct < ct1; ++ct) {
    const int64_t x0 = ct * TWX;
    const int ncols = (int)std::min<int64_t>(TWX, Wo - x0);
    for (int64_t og = 0; og < O; og += RR) {
      auto tmp_at = [&](int64_t o) { return &tmp[o - og][0][0]; };
      auto no_res = [](int64_t) { return static_cast<const float*>(nullptr); };
      for (int j = 0; j < RR;) {
        const int done = channel_tiles<RELU, false, NVX>(xrow + x0, L, og + j, og + RR, rstride, bias, tmp_at, TWX,
                                                         no_res, 0, 1.f, nrows, TWX, false);
        j += done;
        ahead.advance(done);
      }
      const int64_t c = og / RR;
      for (int i = 0; i < R; ++i)
        for (int r = 0; r < nrows; ++r) {
          float* __restrict dst = out_b + c * os.c + ((y0 + r) * R + i) * os.h + x0 * R;
          if (R == 2) {
            const float* __restrict a = tmp[2 * i][r];
            const float* __restrict b = tmp[2 * i + 1][r];
            int l = 0;
            for (; l + VW <= ncols; l += VW) {
              const vf va = aload(a + l), vb = aload(b + l);
              const vf lo = __builtin_shuffle(va, vb, interleave_lo()), hi = __builtin_shuffle(va, vb, interleave_hi());
              if (stream) {
                store_stream(dst + 2 * l, lo);
                store_stream(dst + 2 * l + VW, hi);
              } else {
                std::memcpy(dst + 2 * l, &lo, sizeof(vf));
                std::memcpy(dst + 2 * l + VW, &hi, sizeof(vf));
              }
            }
            for (; l < ncols; ++l) {
              dst[2 * l] = a[l];
              dst[2 * l + 1] = b[l];
            }
          } else {
            for (int l = 0; l < ncols; ++l)
              for (int j = 0; j < R; ++j) dst[l * R + j] = tmp[i * R + j][r][l];
          }
        }
    }
  }
  if (stream) stream_fence();  // the streamed stores are visible before the parallel region ends
}

template <int NVX>
void conv_item_any(bool relu, bool res, int shuffle, const float* xrow, const Layer& L, const float* bias,
                   int64_t O, int64_t rstride, float* out_b, Strides os, const float* res_b, Strides rs,
                   float res_scale, int64_t Wo, int64_t y0, int nrows, int64_t ct0, int64_t ct1, bool stream) {
  if (shuffle > 1) {
    if (relu)
      conv_item_shuffle<true, NVX>(xrow, L, bias, O, rstride, out_b, os, shuffle, Wo, y0, nrows, ct0, ct1, stream);
    else
      conv_item_shuffle<false, NVX>(xrow, L, bias, O, rstride, out_b, os, shuffle, Wo, y0, nrows, ct0, ct1, stream);
    return;
  }
#define NMK_ITEM(R, S) conv_item<R, S, NVX>(xrow, L, bias, O, rstride, out_b, os, res_b, rs, res_scale, Wo, y0, nrows, ct0, ct1, stream)
  if (relu && res) NMK_ITEM(true, true);
  else if (relu) NMK_ITEM(true, false);
  else if (res) NMK_ITEM(false, true);
  else NMK_ITEM(false, false);
#undef NMK_ITEM
}

// Vectors per tile row for an output Wo columns wide. Narrow outputs (small patches) use narrower
// tiles so no vector lane computes a column that does not exist. A sparse layer that widens its
// channels (O >= 4 C, an upsampler's 64->256 conv) runs 2x32 tiles when ungrouped: their input
// window (C channels x 4 rows x 34 columns, 35 KB at C = 64) stays in L1 while its many output
// channels read it, where the 2x64 one (67 KB) does not. EDSR x2 64->256 + shuffle, 320x180, 2
// threads: 1.26-1.28x at 2:32 and 4:32, 1.00x at 8:32 (grouped); the 64->64 body convs, with only
// 64 channels per window, lose 12-15% with 2x32 tiles, so they keep 2x64.
inline int tile_vectors(int64_t Wo, const Layer& L, int64_t O, int64_t C) {
  if (Wo <= VW) return 1;
  if (Wo <= 2 * VW || NV == 2) return 2;
  return (!L.grouped && O >= 4 * C && NV > 2) ? 2 : NV;
}

}  // namespace

extern "C" {

int nmk_abi_version() { return 11; }
int nmk_vector_floats() { return VW; }
int nmk_tile_rows() { return TR; }
int nmk_tile_cols() { return TW; }
int nmk_param_count() { return P_COUNT; }
int nmk_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Floats of workspace nmk_conv2d_ex needs for an input it pads itself (including alignment slack).
int64_t nmk_conv2d_workspace(int64_t B, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t sh,
                             int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  const Geometry g = geometry(B, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw);
  return g.B * g.per_b + slack(g) + 16;
}

// Rows (from the top of the padded input) a conv reads, tile rounding included: a pre-padded
// input must have this many rows (zero below the image) for each image.
int64_t nmk_conv2d_rows_read(int64_t H, int64_t KH, int64_t sh, int64_t ph, int64_t dh) {
  return nmk::rows_read(H, KH, sh, ph, dh, TR);
}

// Floats a pre-padded input must have readable after its last image's last row.
int64_t nmk_conv2d_tail_slack(int64_t row_floats) { return TW + row_floats + 2 * VW; }

// Sparse conv. Output channel o keeps the weights rowptr[o]..rowptr[o+1]-1, each with its absolute
// input channel cin[k], kernel position kpos[k] = kh*KW + kw and value val[k]; bias may be null.
// x: (B, C, H, W) with strides P_XS*. With P_IN_PADDED = 0 it is padded (and, for a column stride
// sw > 1, split into stride phases) into the workspace. With P_IN_PADDED = 1 (sw must be 1) x
// points at the top-left of the conv's padded window inside a zero-bordered hand-off buffer laid
// out (image, row, channel, column): P_XSC is its row width, P_XSH = C * P_XSC, and it has
// nmk_conv2d_rows_read rows per image; no padding pass at all.
// residual: null or (B, O, Ho, Wo) with strides P_RS*: out = act(res_scale * (conv + bias) + residual).
// out: (B, O, Ho, Wo) (with P_SHUFFLE = R: (B, O/R^2, Ho*R, Wo*R)) with strides P_OS*. When P_Z* are
// non-zero the output is the valid region of a hand-off buffer: that border around it is zeroed
// (rows span C_out * P_OSC floats, so P_OSH must equal that).
// Returns 0, -1 on a bad geometry, -2 when the workspace is too large for 32-bit offsets.
int nmk_conv2d_ex(const int64_t* prm, const float* x, float* workspace, const int32_t* rowptr, const int32_t* cin,
                  const int32_t* kpos, const float* val, const float* bias, const float* residual,
                  float res_scale, float* out) {
  const int64_t B = prm[P_B], C = prm[P_C], H = prm[P_H], W = prm[P_W], O = prm[P_O];
  const int64_t KH = prm[P_KH], KW = prm[P_KW], sh = prm[P_SH], sw = prm[P_SW], ph = prm[P_PH], pw = prm[P_PW];
  const int64_t dh = prm[P_DH], dw = prm[P_DW];
  const bool padded = prm[P_IN_PADDED] != 0;
  const int relu = (int)prm[P_RELU];
  const int R = prm[P_SHUFFLE] > 1 ? (int)prm[P_SHUFFLE] : 1;
  int nthreads = (int)prm[P_THREADS];
  if (nthreads < 1) nthreads = 1;
  Geometry g = geometry(B, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw);
  if (g.Ho <= 0 || g.Wo <= 0 || sh < 1 || sw < 1 || dh < 1 || dw < 1) return -1;
  if (R > 4 || (R > 1 && (O % (R * R) != 0 || residual != nullptr))) return -1;
  const Strides xs{prm[P_XSB], prm[P_XSC], prm[P_XSH]};
  const Strides rs{prm[P_RSB], prm[P_RSC], prm[P_RSH]};
  const Strides os{prm[P_OSB], prm[P_OSC], prm[P_OSH]};
  const float* xp;
  if (padded) {
    if (sw != 1 || xs.h != C * xs.c) return -1;
    g.Wq = xs.c;
    g.plane = xs.b;
    g.per_b = xs.b;
    xp = x;
  } else {
    float* ws = align64(workspace);
    xp = ws;
    // 1. pad (and split stride phases) into the workspace.
    pad_input(g, x, xs, ws, slack(g), nthreads, convert_row<float, float>);
  }

  // 2. zero the border of a hand-off output buffer (the tiles write only valid positions).
  const int64_t Cf = O / (R * R);
  if (!zero_border(out, os, B, Cf, g.Ho * R, g.Wo * R, prm[P_ZT], prm[P_ZB], prm[P_ZL], prm[P_ZR], nthreads))
    return -1;

  // 3. workspace offset of every kept weight (relative to the tile's top-left input position).
  const int64_t nnz = rowptr[O];
  std::vector<Entry> ent(nnz);
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t off = entry_offset(g, cin[k], kpos[k]);
    if (off < 0) return -2;  // workspace beyond 8 GB: the caller runs dense
    ent[k] = Entry{(int32_t)off, val[k]};
  }

  Paired pairs;
  Grouped grouped;
  Blocked blocked;
  Split split;
  Layer L = layer_weights(ent.data(), rowptr, kpos, O, C, KH, KW, dw, sw, g.Wq % VW == 0, pairs, grouped, blocked);
  split_by_channels(L, split, cin, O, C, KH, KW, R);
  // the input rows of the next row tile that this one does not read (see NextRows); not for a conv
  // with a few output channels (the 64->3 last conv), whose items have too little work to hide them
  // behind (EDSR x2's last conv: 1.15x without)
  if (sw == 1 && O >= 8) {
    const int64_t span = (TR - 1) * sh + (KH - 1) * dh + 1, next = TR * sh, first = std::max(span, next);
    L.ahead = Layer::Ahead{first, next + span - first, C * g.Wq, g.Wq, C};
  }

  // 4. sparse accumulation, parallel over (image, row tile, column chunk).
  const int nvx = tile_vectors(g.Wo, L, O, C);
  const int64_t twx = nvx * VW;
  const int64_t ctiles = (g.Wo + twx - 1) / twx;
  // columns of 128 per item: whole EDSR x2, per-channel, 1.03x (4:32) and 1.01-1.03x (2:32) against
  // 256 (64: 0.98-0.99x; 512: 1.01-1.02x), once layers were split by input channels and residual rows
  // prefetched (the routed tiles of nmk_conv2d_tiles keep 256)
  const int64_t per_chunk = std::max<int64_t>(1, 128 / twx);
  const int64_t chunks = (ctiles + per_chunk - 1) / per_chunk;
  // An item walks down `band` row tiles of its column chunk, so the rows a row tile shares with the
  // next stay in this core's L2 and NextRows prefetches for this core: whole EDSR x2, per-channel,
  // 1.02x (4:32) and 1.01-1.04x (2:32) with 4 row tiles (8: the same); at least 8 items per thread
  // are kept, so small inputs still spread over the threads.
  const int64_t band = std::clamp<int64_t>(B * g.rtiles * chunks / (8 * std::max(1, nthreads)), 1, 4);
  const int64_t bands = (g.rtiles + band - 1) / band;
  const int64_t items = B * bands * chunks;
  const int64_t rstride = sh * C * g.Wq;
  const bool stream = B * O * g.Ho * g.Wo >= STREAM_MIN_FLOATS;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / (bands * chunks), ch = it % chunks, rt0 = (it % (bands * chunks)) / chunks * band;
    const int64_t ct0 = ch * per_chunk, ct1 = std::min<int64_t>(ctiles, ct0 + per_chunk);
    float* out_b = out + b * os.b;
    const float* res_b = residual ? residual + b * rs.b : nullptr;
    for (int64_t rt = rt0; rt < std::min<int64_t>(g.rtiles, rt0 + band); ++rt) {
      const int64_t y0 = rt * TR;
      const int nrows = (int)std::min<int64_t>(TR, g.Ho - y0);
      const float* xrow = xp + b * g.per_b + y0 * rstride;
#define NMK_RUN(N) conv_item_any<N>(relu, residual != nullptr, R, xrow, L, bias, O, rstride, out_b, os, res_b, rs, res_scale, g.Wo, y0, nrows, ct0, ct1, stream)
      if (nvx == 1)
        NMK_RUN(1);
      else if (nvx == 2)
        NMK_RUN(2);
      else
        NMK_RUN(NV);
#undef NMK_RUN
    }
  }
  return 0;
}

// Tiles of one image, each on its own route, read in place from a zero-bordered hand-off input and
// written in place into a larger output (spatial routing: one call per layer for every tile the
// kernel runs, so one parallel region, no gather, no scatter, no padding pass). The conv is stride 1
// and 'same' (output tile = input tile). prm as for nmk_conv2d_ex, of which only P_C, P_O, P_KH, P_KW,
// P_PH, P_PW, P_XSC (the input rows' width; P_XSH = C * P_XSC), P_RELU, P_RSC, P_RSH, P_OSC, P_OSH,
// P_SHUFFLE and P_THREADS are read; P_B = the number of tiles. tiles: 6 int64 per tile: the offset
// (floats, may be negative) from x to its padded window's top-left, from out to its output's
// top-left, from residual to its residual's top-left, its height, its width and its route. Route r
// keeps the weights rowptrs[r][o]..: cins[r], kposs[r], vals[r] as in nmk_conv2d_ex. The input must
// have nmk_conv2d_rows_read rows and a tile's over-read readable below/after each window, as a
// hand-off buffer has.
int nmk_conv2d_tiles(const int64_t* prm, const int64_t* tiles, const int32_t* const* rowptrs,
                     const int32_t* const* cins, const int32_t* const* kposs, const float* const* vals, int nroutes,
                     const float* x, const float* bias, const float* residual, float res_scale, float* out) {
  const int64_t T = prm[P_B], C = prm[P_C], O = prm[P_O], KH = prm[P_KH], KW = prm[P_KW];
  const int64_t ph = prm[P_PH], pw = prm[P_PW], Wq = prm[P_XSC];
  const int R = prm[P_SHUFFLE] > 1 ? (int)prm[P_SHUFFLE] : 1;
  const bool relu = prm[P_RELU] != 0;
  int nthreads = (int)prm[P_THREADS];
  if (nthreads < 1) nthreads = 1;
  if (2 * ph != KH - 1 || 2 * pw != KW - 1 || prm[P_XSH] != C * Wq || nroutes < 1) return -1;
  if (R > 4 || (R > 1 && (O % (R * R) != 0 || residual != nullptr))) return -1;
  const Strides rs{0, prm[P_RSC], prm[P_RSH]};
  const Strides os{0, prm[P_OSC], prm[P_OSH]};
  // every route's kept weights as workspace offsets (the same row layout for all routes)
  std::vector<std::vector<Entry>> ents(nroutes);
  for (int r = 0; r < nroutes; ++r) {
    if (rowptrs[r] == nullptr) continue;
    const int64_t nnz = rowptrs[r][O];
    ents[r].resize(nnz);
    for (int64_t k = 0; k < nnz; ++k) {
      const int64_t kh = kposs[r][k] / KW, kw = kposs[r][k] % KW;
      const int64_t off = (kh * C + cins[r][k]) * Wq + kw;
      if (off > INT32_MAX) return -2;
      ents[r][k] = Entry{(int32_t)off, vals[r][k]};
    }
  }
  std::vector<Paired> pairs(nroutes);
  std::vector<Grouped> grouped(nroutes);
  std::vector<Blocked> blocked(nroutes);
  std::vector<Split> splits(nroutes);
  std::vector<Layer> wts(nroutes, Layer{Weights{nullptr, nullptr, nullptr}, nullptr, false});
  for (int r = 0; r < nroutes; ++r)
    if (rowptrs[r] != nullptr) {
      wts[r] = layer_weights(ents[r].data(), rowptrs[r], kposs[r], O, C, KH, KW, 1, 1, Wq % VW == 0, pairs[r],
                             grouped[r], blocked[r]);
      split_by_channels(wts[r], splits[r], cins[r], O, C, KH, KW, R);
    }
  // work items: (tile, row tile, column chunk), narrower vector tiles for narrow tiles
  struct Item {
    int64_t tile, y0, ct0, ct1;
    int nrows, nvx;
  };
  std::vector<Item> items;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t* d = tiles + 6 * t;
    const int64_t h = d[3], w = d[4], route = d[5];
    if (h <= 0 || w <= 0 || route < 0 || route >= nroutes || rowptrs[route] == nullptr) return -1;
    const int nvx = tile_vectors(w, wts[route], O, C);
    const int64_t twx = nvx * VW, ctiles = (w + twx - 1) / twx, per_chunk = std::max<int64_t>(1, 256 / twx);
    for (int64_t y0 = 0; y0 < h; y0 += TR)
      for (int64_t ct0 = 0; ct0 < ctiles; ct0 += per_chunk)
        items.push_back(Item{t, y0, ct0, std::min(ctiles, ct0 + per_chunk), (int)std::min<int64_t>(TR, h - y0), nvx});
  }
  const int64_t rstride = C * Wq;
  const int64_t n = (int64_t)items.size();
  int64_t outputs = 0;
  for (int64_t t = 0; t < T; ++t) outputs += tiles[6 * t + 3] * tiles[6 * t + 4] * O;
  const bool stream = outputs >= STREAM_MIN_FLOATS;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t i = 0; i < n; ++i) {
    const Item& it = items[i];
    const int64_t* d = tiles + 6 * it.tile;
    const int64_t route = d[5];
    const float* xrow = x + d[0] + it.y0 * rstride;
    float* out_b = out + d[1];
    const float* res_b = residual ? residual + d[2] : nullptr;
#define NMK_RUN(N) conv_item_any<N>(relu, residual != nullptr, R, xrow, wts[route], bias, O, rstride, out_b, os, res_b, rs, res_scale, d[4], it.y0, it.nrows, it.ct0, it.ct1, stream)
    if (it.nvx == 1)
      NMK_RUN(1);
    else if (it.nvx == 2)
      NMK_RUN(2);
    else
      NMK_RUN(NV);
#undef NMK_RUN
  }
  return 0;
}

// How many consecutive output channels the conv tiles compute together for these weights (CSR as
// for nmk_conv2d_ex): OB when every whole block of OB channels keeps the same positions (masks
// shared by blocks of output channels), else 1.
int nmk_conv_channel_block(const int32_t* rowptr, const int32_t* cin, const int32_t* kpos, int64_t O,
                           int64_t KK) {
  std::vector<Entry> ent(rowptr[O]);
  for (int64_t k = 0; k < rowptr[O]; ++k) ent[k] = Entry{(int32_t)(cin[k] * KK + kpos[k]), 0.f};
  Blocked bl;
  return block_channels(bl, ent.data(), rowptr, O) ? OB : 1;
}

// Into how many blocks of input channels the conv tiles split these weights (CSR as for
// nmk_conv2d_ex, no pixel shuffle): C / SPLIT_CHANNELS when the layer is split (see Split), else 1.
int nmk_conv_input_blocks(const int32_t* rowptr, const int32_t* cin, const int32_t* kpos, int64_t O, int64_t C,
                          int64_t KH, int64_t KW) {
  std::vector<Entry> ent(rowptr[O]);
  for (int64_t k = 0; k < rowptr[O]; ++k) ent[k] = Entry{(int32_t)(cin[k] * KH * KW + kpos[k]), 0.f};
  Paired pairs;
  Grouped grouped;
  Blocked blocked;
  Split split;
  // rows not vector-aligned: no groups, which only run above the density at which a split stops
  Layer L = layer_weights(ent.data(), rowptr, kpos, O, C, KH, KW, 1, 1, false, pairs, grouped, blocked);
  split_by_channels(L, split, cin, O, C, KH, KW, 1);
  return L.split ? (int)split.blocks : 1;
}

// x: (B, I) contiguous; out: (B, O). Same CSR form as nmk_conv2d without kernel positions.
int nmk_linear(const float* x, int64_t B, int64_t I, const int32_t* rowptr, const int32_t* cin, const float* val,
               const float* bias, int64_t O, int relu, float* out, int nthreads) {
  if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t o = 0; o < O; ++o) {
    const int64_t k0 = rowptr[o], k1 = rowptr[o + 1];
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * I;
      float acc = bias ? bias[o] : 0.f;
      for (int64_t k = k0; k < k1; ++k) acc += val[k] * xb[cin[k]];
      out[b * O + o] = relu && acc < 0.f ? 0.f : acc;
    }
  }
  return 0;
}

}  // extern "C"
