// A layer's kept weights as the f32 tiles (nm_kernels.cpp) read them: one entry per kept weight,
// output channels in pairs, the entries grouped by kernel column for aligned loads, and the
// densities at which pairs and groups pay.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace nmk {

// One kept weight: its workspace offset relative to the tile's origin, and its value. Interleaved
// so the weight stream of an output channel is one sequential read.
struct Entry {
  int32_t off;
  float val;
};

// Output channels in pairs (2p, 2p+1): the input positions both keep (one load, two FMAs each),
// then those only 2p keeps, then those only 2p+1 keeps. At 50% density two channels share a
// quarter of their positions, so a pair loads 3/4 of what two single channels load.
struct Entry2 {
  int32_t off;
  float va, vb;
};

struct Paired {
  std::vector<Entry2> both;
  std::vector<Entry> single;
  std::vector<int64_t> bp;  // pair p: both[bp[p], bp[p+1])
  std::vector<int64_t> sp;  // pair p: only 2p single[sp[2p], sp[2p+1]), only 2p+1 single[sp[2p+1], sp[2p+2])
};

inline Paired pair_channels(const Entry* ent, const int32_t* rowptr, int64_t O) {
  Paired pw;
  const int64_t P = (O + 1) / 2;
  pw.bp.assign(P + 1, 0);
  pw.sp.assign(2 * P + 1, 0);
  pw.single.reserve(rowptr[O]);
  std::vector<Entry> a, b;
  auto by_off = [](const Entry& x, const Entry& y) { return x.off < y.off; };
  for (int64_t p = 0; p < P; ++p) {
    const int64_t oa = 2 * p, ob = 2 * p + 1;
    a.assign(ent + rowptr[oa], ent + rowptr[oa + 1]);
    if (ob < O) b.assign(ent + rowptr[ob], ent + rowptr[ob + 1]); else b.clear();
    std::sort(a.begin(), a.end(), by_off);
    std::sort(b.begin(), b.end(), by_off);
    std::vector<Entry> only_b;
    size_t i = 0, j = 0;
    while (i < a.size() || j < b.size()) {
      if (j == b.size() || (i < a.size() && a[i].off < b[j].off)) pw.single.push_back(a[i++]);
      else if (i == a.size() || b[j].off < a[i].off) only_b.push_back(b[j++]);
      else { pw.both.push_back(Entry2{a[i].off, a[i].val, b[j].val}); ++i; ++j; }
    }
    pw.sp[2 * p + 1] = (int64_t)pw.single.size();
    pw.single.insert(pw.single.end(), only_b.begin(), only_b.end());
    pw.sp[2 * p + 2] = (int64_t)pw.single.size();
    pw.bp[p + 1] = (int64_t)pw.both.size();
  }
  return pw;
}

// A layer's kept weights: per output channel (CSR) and, where pairing pays, in channel pairs.
struct Weights {
  const Entry* ent;
  const int32_t* rowptr;
  const Paired* pairs;  // null: every channel alone
};

// The same weights split by kernel column kw (group g = kw), for aligned loads. A tile's loads for
// one kernel column all sit the same distance u (< VW floats) past a vector boundary, so the group
// loads whole aligned vectors from u floats earlier into NVX + 1 accumulators (NVX when u = 0) and
// adds them to the tile shifted by u. An unaligned load that straddles two cache lines costs two
// L1 accesses; at 16:32 this is most loads of the ungrouped tile. Needs rows a whole number of
// vectors apart (then every input channel and row of a column shares u).
struct Grouped {
  std::vector<std::vector<Entry>> ent;       // per group, channel o: ent[g][rowptr[g][o]..rowptr[g][o+1])
  std::vector<std::vector<int32_t>> rowptr;
  std::vector<Paired> pairs;                 // per group, when pairing pays
  std::vector<Weights> w;                    // per group, views of the above
  std::vector<int64_t> shift;                // per group: the column offset kw * dw / sw of its entries
};

inline void group_by_column(Grouped& gr, const Entry* ent, const int32_t* rowptr, const int32_t* kpos, int64_t O,
                            int64_t KW, int64_t dw, int64_t sw, bool paired) {
  gr.ent.assign(KW, {});
  gr.rowptr.assign(KW, std::vector<int32_t>(O + 1, 0));
  gr.pairs.assign(KW, {});
  gr.w.clear();
  gr.shift.clear();
  for (int64_t o = 0; o < O; ++o) {
    for (int32_t k = rowptr[o]; k < rowptr[o + 1]; ++k) gr.ent[kpos[k] % KW].push_back(ent[k]);
    for (int64_t g = 0; g < KW; ++g) gr.rowptr[g][o + 1] = (int32_t)gr.ent[g].size();
  }
  for (int64_t g = 0; g < KW; ++g) {
    if (paired) gr.pairs[g] = pair_channels(gr.ent[g].data(), gr.rowptr[g].data(), O);
    gr.w.push_back(Weights{gr.ent[g].data(), gr.rowptr[g].data(), paired ? &gr.pairs[g] : nullptr});
    gr.shift.push_back(g * dw / sw);
  }
}

// Output channels in blocks of OB that keep the same input positions (masks trained with
// out_block a multiple of OB: "coarse" N:M). A block's tile loads each input vector once for
// OB channels' FMAs, where a lone channel loads one per FMA: the tiles turn from load-bound into
// FMA-bound, and the block's channels read one small set of input rows, which stays in L1.
#ifdef NMK_OB
constexpr int OB = NMK_OB;  // experiments
#else
constexpr int OB = 4;
#endif
struct BlockEntry {
  int32_t off;
  float val[OB];  // the block's channels' weights at this position
};

struct Blocked {
  std::vector<BlockEntry> ent;  // block b: ent[bp[b], bp[b+1])
  std::vector<int64_t> bp;
};

// Whether every whole block of OB consecutive output channels keeps the same positions (O % OB
// channels at the end run alone); when so, fills bl. At least one block is needed.
inline bool block_channels(Blocked& bl, const Entry* ent, const int32_t* rowptr, int64_t O) {
  const int64_t nb = O / OB;
  if (nb == 0) return false;
  std::vector<std::vector<Entry>> ch(OB);
  auto by_off = [](const Entry& x, const Entry& y) { return x.off < y.off; };
  bl.ent.clear();
  bl.bp.assign(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) {
    for (int j = 0; j < OB; ++j) {
      const int64_t o = b * OB + j;
      ch[j].assign(ent + rowptr[o], ent + rowptr[o + 1]);
      std::sort(ch[j].begin(), ch[j].end(), by_off);
      if (ch[j].size() != ch[0].size()) return false;
    }
    for (size_t k = 0; k < ch[0].size(); ++k) {
      BlockEntry e{ch[0][k].off, {}};
      for (int j = 0; j < OB; ++j) {
        if (ch[j][k].off != e.off) return false;
        e.val[j] = ch[j][k].val;
      }
      bl.ent.push_back(e);
    }
    bl.bp[b + 1] = (int64_t)bl.ent.size();
  }
  return true;
}

// A sparse layer's weights split by blocks of SPLIT_CHANNELS input channels: a tile runs every
// output channel over the first block's inputs, keeping its partial sums aside, then over the
// next block's (conv_item_split in nm_kernels.cpp). With per-channel masks each output channel
// reads a few scattered positions of all C input channels, a window (64 channels x 4 rows x 66
// columns, 67 KB) larger than L1, where about a third of the time went to misses (section
// kernel_limits of docs/BENCHMARKS.md); one block's window (32 channels) mostly stays in L1 while
// all output channels read it. Whole EDSR x2 f32, per-channel masks, 2 threads, interleaved: 1.11x
// at 4:32 and 1.06x at 2:32 (blocks of 16 channels: 1.11x / 1.03x; the partial sums of 32 or 16
// output channels at a time instead of 64: 1.09x / 1.06x and 1.08x / 1.04x).
constexpr int64_t SPLIT_CHANNELS = 32;
constexpr int64_t SPLIT_OUTPUTS = 64;  // output channels whose partial sums are kept at once

struct Split {
  std::vector<Entry> ent;  // block g, output channel o: ent[rp[g * (O + 1) + o], rp[g * (O + 1) + o + 1])
  std::vector<int64_t> rp;
  int64_t blocks = 0;
};

// A layer as the tile loops see it: in blocks when its channels share positions in blocks of OB,
// else grouped when its rows allow aligned loads, else ungrouped.
struct Layer {
  Weights all;
  const Grouped* grouped;  // null: ungrouped
  bool paired;             // channels in pairs (all.pairs, or each group's pairs)
  const Blocked* blocked = nullptr;  // null: channels not in blocks
  const Split* split = nullptr;      // null: not split by input channels
  // The input rows the next row tile reads and this one does not (see NextRows in nm_kernels.cpp):
  // the first of them and how many, counted from the tile's first input row; their length in
  // floats (C channels of wq), and wq. count 0: none prefetched.
  struct Ahead {
    int64_t first = 0, count = 0, row = 0, wq = 0, channels = 0;
  } ahead;
};

// The densities at which pairs and kernel-column groups start to pay (NMK_PAIR_MIN / NMK_GROUP_MIN
// override them, for experiments).
//
// Pairs: at density d two channels share about d^2 of their positions. Measured on the 64->64 and
// 64->256 (+ shuffle) convs at 320x180, 2 threads: 1.08-1.13x at 16:32 and 2:4, 1.05x at 8:32;
// below 20% density (4:32, 2:32) the shared positions are too few and channels run alone.
//
// Groups (see Grouped), against the ungrouped tiles on the same convs: 1.17-1.21x at 16:32 and 2:4,
// 1.13-1.16x at 8:32, 0.96-1.09x at 4:32 and 0.77-0.92x at 2:32. Below 20% the cost is not the
// groups' own accumulators and shifted sums: keeping all three groups' sums in registers at once
// and shifting them into place in one pass gave the same 0.90-1.11x at 4:32 and 0.81-0.95x at
// 2:32. 2x64 tiles stay best grouped (3x64, 4x32, 3x48, 2x48: 0.87-0.99x at 16:32).
#ifdef NMK_PAIR_MIN
constexpr double PAIR_MIN_DENSITY = NMK_PAIR_MIN;
#else
constexpr double PAIR_MIN_DENSITY = 0.2;
#endif
#ifdef NMK_GROUP_MIN
constexpr double GROUP_MIN_DENSITY = NMK_GROUP_MIN;
#else
constexpr double GROUP_MIN_DENSITY = 0.2;
#endif

// Whether nnz kept weights of an O x C x KH x KW conv are at least that dense.
inline bool dense_enough(int64_t nnz, int64_t O, int64_t C, int64_t KH, int64_t KW, double density) {
  return (double)nnz >= density * (double)(O * C * KH * KW);
}

inline bool worth_pairing(int64_t nnz, int64_t O, int64_t C, int64_t KH, int64_t KW) {
  return O >= 2 && dense_enough(nnz, O, C, KH, KW, PAIR_MIN_DENSITY);
}

inline bool worth_grouping(int64_t nnz, int64_t O, int64_t C, int64_t KH, int64_t KW) {
  return dense_enough(nnz, O, C, KH, KW, GROUP_MIN_DENSITY);
}

// A layer's weights as the tiles read them, built once per call into ``pairs`` / ``grouped`` /
// ``blocked`` (which must outlive the Layer): in blocks of OB channels when they share positions;
// else grouped by kernel column when that pays and rows are a whole number of vectors apart
// (aligned_rows), else whole; in pairs, in either case, when pairing pays.
inline Layer layer_weights(const Entry* ent, const int32_t* rowptr, const int32_t* kpos, int64_t O, int64_t C,
                           int64_t KH, int64_t KW, int64_t dw, int64_t sw, bool aligned_rows, Paired& pairs,
                           Grouped& grouped, Blocked& blocked) {
  const int64_t nnz = rowptr[O];
  // Blocks first: where channels share positions they beat pairs and groups (see Blocked), and
  // the channels left over at the end (O % OB) run alone.
  if (block_channels(blocked, ent, rowptr, O)) return Layer{Weights{ent, rowptr, nullptr}, nullptr, false, &blocked};
  const bool paired = worth_pairing(nnz, O, C, KH, KW);
  const bool group = aligned_rows && worth_grouping(nnz, O, C, KH, KW);
  if (group)
    group_by_column(grouped, ent, rowptr, kpos, O, KW, dw, sw, paired);
  else if (paired)
    pairs = pair_channels(ent, rowptr, O);
  return Layer{Weights{ent, rowptr, paired && !group ? &pairs : nullptr}, group ? &grouped : nullptr, paired};
}

// Splits L's weights by input-channel blocks into ``split`` (which must outlive L) where that pays:
// lone channels (no blocks, pairs or groups) below the density at which groups start, at least two
// whole blocks of input channels, and fewer than 4C output channels (a widening conv runs 2x32
// tiles, whose window already stays in L1; split, the EDSR x2 upsampler made the model 0.97-0.99x
// as fast), nor convs with a fused pixel shuffle (shuffle > 1; same reason).
// cin: each entry's input channel (the CSR of nmk_conv2d_ex).
inline void split_by_channels(Layer& L, Split& split, const int32_t* cin, int64_t O, int64_t C, int64_t KH,
                              int64_t KW, int shuffle) {
  const Entry* ent = L.all.ent;
  const int32_t* rowptr = L.all.rowptr;
  if (shuffle > 1 || L.blocked || L.grouped || L.paired || O >= 4 * C || C % SPLIT_CHANNELS != 0 || C < 2 * SPLIT_CHANNELS ||
      worth_grouping(rowptr[O], O, C, KH, KW))
    return;
  split.blocks = C / SPLIT_CHANNELS;
  split.ent.clear();
  split.ent.reserve(rowptr[O]);
  split.rp.assign(split.blocks * (O + 1), 0);
  for (int64_t g = 0; g < split.blocks; ++g) {
    int64_t* rp = split.rp.data() + g * (O + 1);
    rp[0] = (int64_t)split.ent.size();
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t k = rowptr[o]; k < rowptr[o + 1]; ++k)
        if (cin[k] / SPLIT_CHANNELS == g) split.ent.push_back(ent[k]);
      rp[o + 1] = (int64_t)split.ent.size();
    }
  }
  L.split = &split;
}

}  // namespace nmk
