// The bf16 kernel's AMX path (nm_bf16.cpp): a stride-1 conv whose kept positions are shared by
// blocks of 16 output channels (masks with `out_block` 16, and dense convs) runs as tile products
// C[16 o][16 px] += A[16 o][32 k] x B[32 k][16 px] on AMX (`tdpbf16ps`: 16x16x32 multiply-adds
// per instruction, against 16x2 for `vdpbf16ps`). A block's kept positions form a dense K axis: A
// holds its kept weights (packed once per call), B is gathered per 64-pixel row segment from the
// kept input rows, once per block of 16 output channels instead of once per output channel.
//
// Measured (EDSR body conv 64->64 3x3 at 320x180, masks shared by 16-channel blocks, 2 threads,
// bf16 in and out, input in cache): 0.71 ms at 2:32 and 0.91 ms at 4:32, against 2.25 / 4.05 ms
// for the vector path and 0.89 / 1.24 ms for the fp16 kernel. The tile products are the least of
// it: the gather and the activation traffic set the time, so a residual block runs as one call
// (nm_amx_block.h: its intermediate never leaves L2; 16 blocks in a chain 24 ms against 30 ms as 32
// convs) and bf16 hand-offs stay in the caches for the next conv (see AmxSink::stream).
// A dense conv with few outputs folds its tap columns into the tile rows (folded_conv); EDSR's
// upsampler conv and last conv run as one call the same way (nm_amx_tail.h).
// Per-channel masks cannot use AMX: 16 channels' kept positions rarely coincide, so a block's K
// axis would be nearly dense.
//
// Gather: two kept positions (k, k+1) give one B row of 16 pixels, their bf16 values interleaved
// (pixels in order; see Worker::gather). A block's K axis is padded to whole 32s with zero weights,
// and its padded B rows with zeros.
#pragma once
#include "nm_half_common.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && !defined(NMK_NO_AMX)
#define NMK_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#else
#define NMK_AMX 0
#endif

// Ablations for benchmarks/bench_amx_limits.py (a build with -DNMK_AMX_ABLATE=k times what one part
// of a fused residual block costs; its outputs are wrong): 1 the block's output written to a
// thread-local scratch (no traffic to the hand-off), 2 no epilogue for its second conv, 3 no gather
// (the B tiles keep what they hold), 4 no tile loads or products (the gather kept), 5 the first
// conv's input rows read from a 4-row region that stays in L2 (not from L3). 0: none.
#ifndef NMK_AMX_ABLATE
#define NMK_AMX_ABLATE 0
#endif

namespace nmk_amx {

using namespace nmk;

#if NMK_AMX

constexpr int64_t OB = 16;   // output channels per block (rows of A and C)
constexpr int64_t SEG = 64;  // pixels per row segment (4 C tiles of 16)
// A conv's work item: BAND rows of CHUNK segments, row by row (a row's input lines are read once
// across its segments, and two of the next row's three input rows are still in cache; items of
// one 64-column segment read each segment's edge lines twice: one conv 0.78 ms against 0.73 ms).
constexpr int64_t CHUNK = 8;
constexpr int64_t BAND = 8;

// The process may use AMX tiles (Linux grants the 8 KB tile state on request) and the user did not
// turn the path off (NMRESTORE_DISABLE_AMX, read at each call so tests can compare both paths).
inline bool amx_enabled() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  const char* off = std::getenv("NMRESTORE_DISABLE_AMX");
  return granted && !(off && off[0] && !(off[0] == '0' && off[1] == 0));
}

// Convs this process ran on the AMX path (nmk_amx_convs: tests check that it is taken).
inline std::atomic<int64_t> amx_convs{0};

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether every block of 16 consecutive output channels (the last may have fewer: its A rows are
// padded with zero weights) keeps the same positions (in any order).
inline bool shared_blocks(const int32_t* rowptr, const int32_t* cin, const int32_t* kpos, int64_t O, int64_t taps) {
  std::vector<char> seen;
  for (int64_t o0 = 0; o0 < O; o0 += OB) {
    const int64_t n = rowptr[o0 + 1] - rowptr[o0];
    if (n == 0) return false;
    int64_t cmax = 0;
    for (int64_t k = rowptr[o0]; k < rowptr[o0 + 1]; ++k) cmax = std::max<int64_t>(cmax, cin[k] + 1);
    seen.assign(cmax * taps, 0);
    for (int64_t k = rowptr[o0]; k < rowptr[o0 + 1]; ++k) seen[cin[k] * taps + kpos[k]] = 1;
    for (int64_t o = o0 + 1; o < std::min(O, o0 + OB); ++o) {
      if (rowptr[o + 1] - rowptr[o] != n) return false;
      for (int64_t k = rowptr[o]; k < rowptr[o + 1]; ++k)
        if (cin[k] >= cmax || !seen[cin[k] * taps + kpos[k]]) return false;
    }
  }
  return true;
}

// One block's packed operands: input offsets of its kept positions (pairs), its A tiles.
struct Block {
  std::vector<int32_t> off;  // 2 * pairs workspace offsets (an odd count repeats the last)
  std::vector<uint16_t> a;   // steps x [16 o][32 k] bf16, zero on padded k
  int64_t pairs = 0, steps = 0;
  int64_t channels = 0;   // output channels in the block (the last may have fewer than 16)
  bool permuted = false;  // gathered with vpunpck{l,h}wd (see Worker::gather)
  bool reuses = false;    // the block before gathers the same B tiles and leaves them (a dense conv)
};

inline bool pack_blocks(const Geometry& g, const int32_t* rowptr, const int32_t* cin, const int32_t* kpos,
                        const uint16_t* val, int64_t O, int64_t taps, std::vector<Block>& blocks) {
  blocks.assign((O + OB - 1) / OB, Block{});
  std::vector<uint16_t> by_key;  // one channel's weights by position (cin * taps + kpos)
  for (int64_t b = 0; b < (int64_t)blocks.size(); ++b) {
    Block& bl = blocks[b];
    const int64_t o0 = b * OB, k0 = rowptr[o0], n = rowptr[o0 + 1] - k0;
    std::vector<std::pair<int64_t, int64_t>> pos;  // (offset, key), in address order
    int64_t keys = 0;
    for (int64_t k = k0; k < k0 + n; ++k) {
      const int64_t off = entry_offset(g, cin[k], kpos[k]);
      if (off < 0) return false;
      pos.emplace_back(off, cin[k] * taps + kpos[k]);
      keys = std::max(keys, cin[k] * taps + kpos[k] + 1);
    }
    std::sort(pos.begin(), pos.end());
    bl.pairs = (n + 1) / 2;
    bl.steps = (n + 31) / 32;
    bl.channels = std::min(OB, O - o0);
    bl.permuted = bl.pairs > 2 * bl.channels;
    bl.off.resize(2 * bl.pairs);
    for (int64_t i = 0; i < 2 * bl.pairs; ++i) bl.off[i] = (int32_t)pos[std::min(i, n - 1)].first;
    bl.a.assign(bl.steps * OB * 32, 0);
    for (int64_t j = 0; j < std::min(OB, O - o0); ++j) {  // channels past O keep zero weights
      by_key.assign(keys, 0);
      for (int64_t k = rowptr[o0 + j]; k < rowptr[o0 + j + 1]; ++k) by_key[cin[k] * taps + kpos[k]] = val[k];
      for (int64_t i = 0; i < n; ++i) bl.a[(i / 32) * OB * 32 + j * 32 + i % 32] = by_key[pos[i].second];
    }
    // at most two steps: none of the previous block's B buffers was written twice
    bl.reuses = b > 0 && bl.steps <= 2 && bl.off == blocks[b - 1].off && bl.permuted == blocks[b - 1].permuted;
  }
  return true;
}

// out = act(res_scale * (conv + bias) + residual), as the vector path's epilogue; f32 and/or bf16.
struct AmxSink {
  float* out;
  Strides os;
  uint16_t* out2;
  Strides o2s;
  const void* res;  // f32, or bf16 when res16
  Strides rs;
  bool res16;
  const float* bias;
  float res_scale;
  bool relu;
  // Streamed (cache-bypassing) stores for an f32 output (read later by PyTorch, not by the next
  // conv) and a fused shuffle's high-resolution output; a bf16 hand-off otherwise stays in the
  // caches, where the next conv reads it (streamed, a chain of 16 EDSR blocks took 1.6x the time,
  // 48 ms against 30 ms; cached, EDSR's first conv with its f32 output took 2.5x).
  bool stream;
};

inline __m512 residual16(const AmxSink& s, int64_t at, __mmask16 mk) {
  if (s.res16)
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t*)s.res + at)), 16));
  return _mm512_maskz_loadu_ps(mk, (const float*)s.res + at);
}

// A segment's 16 channels x 64 columns (`t`, f32 sums) through the epilogue into the sink.
// Pixels back in order after a permuted gather (Worker::gather): tile 2g's column 4l + i holds pixel
// 32g + 8l + i, tile 2g + 1's pixel 32g + 8l + 4 + i (l, i < 4), as the vector kernel's lo / hi sums.
inline const __m512i& unperm_first() {
  static const __m512i v = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  return v;
}
inline const __m512i& unperm_second() {
  static const __m512i v = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  return v;
}
inline void unpermute(float (&t)[OB][SEG], int64_t channels) {
  for (int64_t j = 0; j < channels; ++j)
    for (int64_t c0 = 0; c0 < SEG; c0 += 32) {
      const __m512 a = _mm512_load_ps(&t[j][c0]), b = _mm512_load_ps(&t[j][c0 + 16]);
      _mm512_store_ps(&t[j][c0], _mm512_permutex2var_ps(a, unperm_first(), b));
      _mm512_store_ps(&t[j][c0 + 16], _mm512_permutex2var_ps(a, unperm_second(), b));
    }
}

// The common case of epilogue(): a whole segment of 16 channels into a bf16 hand-off alone, a bf16
// residual if any; no masks or branches in the loop (16 fused EDSR blocks, 4:32: 26.7 ms against
// 28.8 ms with the general loop).
template <bool RELU, bool RES, bool PERM>
inline void epilogue_bf16(const float (&t)[OB][SEG], const AmxSink& s, int64_t b, int64_t o0, int64_t y,
                          int64_t x0) {
  const __m512 vs = _mm512_set1_ps(s.res_scale), zero = _mm512_setzero_ps();
  const __m512i first = unperm_first(), second = unperm_second();
  const uint16_t* res = RES ? static_cast<const uint16_t*>(s.res) + b * s.rs.b + o0 * s.rs.c + y * s.rs.h + x0 : nullptr;
  uint16_t* oh = s.out2 + b * s.o2s.b + o0 * s.o2s.c + y * s.o2s.h + x0;
#pragma GCC unroll 2
  for (int64_t j = 0; j < OB; ++j) {
    const __m512 vb = _mm512_set1_ps(s.bias ? s.bias[o0 + j] : 0.f);
#pragma GCC unroll 2
    for (int64_t c0 = 0; c0 < SEG; c0 += 32) {
      const __m512 lo = _mm512_load_ps(&t[j][c0]), hi = _mm512_load_ps(&t[j][c0 + 16]);
      __m512 v0 = _mm512_add_ps(PERM ? _mm512_permutex2var_ps(lo, first, hi) : lo, vb);
      __m512 v1 = _mm512_add_ps(PERM ? _mm512_permutex2var_ps(lo, second, hi) : hi, vb);
      if (RES) {
        const __m512i r = _mm512_loadu_si512(res + j * s.rs.c + c0);
        const __m512 r0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r)), 16));
        const __m512 r1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r, 1)), 16));
        v0 = _mm512_fmadd_ps(v0, vs, r0);
        v1 = _mm512_fmadd_ps(v1, vs, r1);
      }
      if (RELU) v0 = _mm512_max_ps(v0, zero), v1 = _mm512_max_ps(v1, zero);
      _mm512_storeu_si512(oh + j * s.o2s.c + c0, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
    }
  }
}

template <bool RELU, bool RES>
inline void epilogue(float (&t)[OB][SEG], const AmxSink& s, int64_t b, int64_t o0, int64_t y, int64_t x0,
                     int64_t ncols, int64_t nch, bool permuted) {
  if (ncols == SEG && nch == OB && s.out == nullptr && (!RES || s.res16)) {
    permuted ? epilogue_bf16<RELU, RES, true>(t, s, b, o0, y, x0) : epilogue_bf16<RELU, RES, false>(t, s, b, o0, y, x0);
    return;
  }
  if (permuted) unpermute(t, nch);
  const __m512 vs = _mm512_set1_ps(s.res_scale), zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < nch; ++j) {
    const int64_t o = o0 + j;
    const __m512 vb = _mm512_set1_ps(s.bias ? s.bias[o] : 0.f);
    const int64_t rat = b * s.rs.b + o * s.rs.c + y * s.rs.h + x0;
    float* of = s.out ? s.out + b * s.os.b + o * s.os.c + y * s.os.h + x0 : nullptr;
    uint16_t* oh = s.out2 ? s.out2 + b * s.o2s.b + o * s.o2s.c + y * s.o2s.h + x0 : nullptr;
    for (int64_t c0 = 0; c0 < ncols; c0 += 32) {  // 32 columns: one 64-byte bf16 store
      const bool full = ncols - c0 >= 32;
      __m512 v[2];
      __mmask16 mk[2];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int64_t m = full ? 16 : std::max<int64_t>(0, std::min<int64_t>(16, ncols - c0 - 16 * h));
        mk[h] = (__mmask16)(m == 16 ? 0xffff : (1u << m) - 1);
        v[h] = _mm512_add_ps(_mm512_load_ps(&t[j][c0 + 16 * h]), vb);
        if (RES) v[h] = _mm512_fmadd_ps(v[h], vs, residual16(s, rat + c0 + 16 * h, mk[h]));
        if (RELU) v[h] = _mm512_max_ps(v[h], zero);
        if (of && mk[h]) put16(of + c0 + 16 * h, mk[h], v[h], s.stream);
      }
      if (!oh) continue;
      const __m512i pair = (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]);
      _mm512_mask_storeu_epi16(oh + c0, (__mmask32)mk[0] | ((__mmask32)mk[1] << 16), pair);  // cached
    }
  }
}

// A shuffling epilogue's first pass: pixels in order, then the sink's bias and ReLU, in place.
inline void bias_relu_in_place(float (&t)[OB][SEG], const AmxSink& s, int64_t o0, int64_t nch, bool permuted) {
  if (permuted) unpermute(t, nch);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < nch; ++j) {
    const __m512 vb = _mm512_set1_ps(s.bias ? s.bias[o0 + j] : 0.f);
    for (int64_t c0 = 0; c0 < SEG; c0 += 16) {
      const __m512 v = _mm512_add_ps(_mm512_load_ps(&t[j][c0]), vb);
      _mm512_store_ps(&t[j][c0], s.relu ? _mm512_max_ps(v, zero) : v);
    }
  }
}

// With a fused pixel shuffle of factor R (16 % R == 0, no residual): bias and ReLU in place, then
// the R channels of each (c, i) interleaved into high-resolution row y * R + i (as nm_bf16.cpp).
inline void epilogue_shuffle(float (&t)[OB][SEG], const AmxSink& s, int R, int64_t b, int64_t o0, int64_t y,
                             int64_t x0, int64_t ncols, int64_t nch, bool permuted) {
  bias_relu_in_place(t, s, o0, nch, permuted);
  for (int64_t g = 0; g < nch; g += R) {
    const int64_t og = o0 + g, c = og / (R * R), i = (og / R) % R, hr = y * R + i;
    const float* rows[4] = {t[g], t[g + std::min(1, R - 1)], t[g + std::min(2, R - 1)], t[g + std::min(3, R - 1)]};
    float* df = s.out ? s.out + b * s.os.b + c * s.os.c + hr * s.os.h + x0 * R : nullptr;
    uint16_t* dh = s.out2 ? s.out2 + b * s.o2s.b + c * s.o2s.c + hr * s.o2s.h + x0 * R : nullptr;
    shuffle_row(rows, R, (int)ncols, df, dh, s.stream, [](__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); },
                [](float v) { return to_bf16(v); });
  }
}

inline void epilogue_any(float (&t)[OB][SEG], const AmxSink& s, int R, int64_t b, int64_t o0, int64_t y, int64_t x0,
                         int64_t ncols, int64_t nch, bool permuted) {
  if (R > 1)
    epilogue_shuffle(t, s, R, b, o0, y, x0, ncols, nch, permuted);
  else if (s.res)
    s.relu ? epilogue<true, true>(t, s, b, o0, y, x0, ncols, nch, permuted)
           : epilogue<false, true>(t, s, b, o0, y, x0, ncols, nch, permuted);
  else
    s.relu ? epilogue<true, false>(t, s, b, o0, y, x0, ncols, nch, permuted)
           : epilogue<false, false>(t, s, b, o0, y, x0, ncols, nch, permuted);
}

// One thread's AMX state and scratch: the tile configuration, the B tiles, the C tiles' f32 copy.
class Worker {
 public:
  Worker() {
    TileConfig cfg;
    for (int i = 0; i < 7; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    _tile_loadconfig(&cfg);
  }
  ~Worker() { _tile_release(); }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Output columns [x0, x0 + ncols) (ncols <= SEG) of one output row, every block, from `xb`: the
  // padded input at that row and column x0 (block offsets are relative to it); each block's 16
  // channels x 64 columns of sums go to emit(t, first channel, permuted: see unpermute()).
  template <typename Emit>
  void segment(const uint16_t* xb, const std::vector<Block>& blocks, Emit&& emit) {
    const __m512i qi = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);  // see gather()
    // K step by K step of every block, the next step gathered (the next block's first, after a
    // block's last) before this one is multiplied, so the tile loads never wait on stores just
    // issued; gathered steps take turns between two pairs of B buffers (`parity`)
    int64_t gathered = 0, base = 0;  // steps gathered so far; the parity of this block's first step
    if (!blocks.empty()) gather(xb, blocks[0], 0, gathered++ & 1, qi);
    for (size_t ob = 0; ob < blocks.size(); ++ob) {
      const Block& bl = blocks[ob];
      if (!bl.reuses) base = (gathered - 1) & 1;  // its first step was gathered last
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < bl.steps; ++s) {
        if (s + 1 < bl.steps) {
          if (!bl.reuses) gather(xb, bl, s + 1, gathered++ & 1, qi);
        } else if (ob + 1 < blocks.size() && !blocks[ob + 1].reuses) {
          gather(xb, blocks[ob + 1], 0, gathered++ & 1, qi);
        }
        if constexpr (NMK_AMX_ABLATE == 4) continue;
        uint16_t(*row)[16][32] = buffer(bl, s, (base + s) & 1);
        _tile_loadd(4, bl.a.data() + s * OB * 32, 64);
        _tile_loadd(5, row[0], 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, row[1], 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, row[2], 64);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, row[3], 64);
        _tile_dpbf16ps(3, 4, 6);
      }
      _tile_stored(0, &t_[0][0], SEG * 4);
      _tile_stored(1, &t_[0][16], SEG * 4);
      _tile_stored(2, &t_[0][32], SEG * 4);
      _tile_stored(3, &t_[0][48], SEG * 4);
      emit(t_, (int64_t)ob * OB, bl.permuted);
    }
  }

 private:
  // K step s of block `bl` at `xb` into B buffer s % 2: two kept positions per B row, interleaved.
  // In pixel order: each row's quadwords reordered (`vpermq`: 128-bit lane l holds pixels 4l..4l+3
  // and 16+4l..16+4l+3), then `vpunpck{l,h}wd` (16 fused EDSR blocks at 2:32: 24.3 ms against 26.2
  // with `vpermt2w`, the same at 4:32). Where a block has many more kept pairs than output channels
  // (EDSR's dense last conv, 64 -> 3: 288 pairs) the unpacks alone interleave them in a permuted
  // order within 128-bit lanes that the epilogue undoes (unpermute()).
  void gather(const uint16_t* xb, const Block& bl, int64_t s, int64_t parity, __m512i qi) {
    if constexpr (NMK_AMX_ABLATE == 3) return;
    uint16_t(*row)[16][32] = buffer(bl, s, parity);
    const int64_t p0 = s * 16, p1 = std::min(bl.pairs, p0 + 16);
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* pa = xb + bl.off[2 * p];
      const uint16_t* pb = xb + bl.off[2 * p + 1];
      const __m512i a0 = _mm512_loadu_si512(pa), a1 = _mm512_loadu_si512(pa + 32);
      const __m512i b0 = _mm512_loadu_si512(pb), b1 = _mm512_loadu_si512(pb + 32);
      if (bl.permuted) {
        _mm512_store_si512(row[0][p - p0], _mm512_unpacklo_epi16(a0, b0));
        _mm512_store_si512(row[1][p - p0], _mm512_unpackhi_epi16(a0, b0));
        _mm512_store_si512(row[2][p - p0], _mm512_unpacklo_epi16(a1, b1));
        _mm512_store_si512(row[3][p - p0], _mm512_unpackhi_epi16(a1, b1));
      } else {
        const __m512i a0p = _mm512_permutexvar_epi64(qi, a0), b0p = _mm512_permutexvar_epi64(qi, b0);
        const __m512i a1p = _mm512_permutexvar_epi64(qi, a1), b1p = _mm512_permutexvar_epi64(qi, b1);
        _mm512_store_si512(row[0][p - p0], _mm512_unpacklo_epi16(a0p, b0p));
        _mm512_store_si512(row[1][p - p0], _mm512_unpackhi_epi16(a0p, b0p));
        _mm512_store_si512(row[2][p - p0], _mm512_unpacklo_epi16(a1p, b1p));
        _mm512_store_si512(row[3][p - p0], _mm512_unpackhi_epi16(a1p, b1p));
      }
    }
    // padded K rows (only in the tail buffer): zero weights, and zero inputs too (stale rows could
    // hold an inf); rows past the last block's stay zero, so equal blocks write none
    if (p1 - p0 < 16) {
      for (int64_t p = p1 - p0; p < tail_rows_[parity]; ++p)
        for (int q = 0; q < 4; ++q) _mm512_store_si512(row[q][p], _mm512_setzero_si512());
      tail_rows_[parity] = p1 - p0;
    }
  }

  // The B buffer of step s: a partial last step has its own, whose padded rows stay zero.
  uint16_t (*buffer(const Block& bl, int64_t s, int64_t parity))[16][32] {
    return bt_[(s + 1 == bl.steps && bl.pairs % 16 ? 2 : 0) + parity];
  }

  // B tiles: (full, full, partial, partial) buffer x 16-pixel group x (pair row, 16 px x 2)
  alignas(64) uint16_t bt_[4][4][16][32];
  int64_t tail_rows_[2] = {16, 16};  // rows of each partial buffer that may be nonzero
  alignas(64) float t_[OB][SEG];
};

// The blocks of a conv whose kept positions blocks of 16 output channels share (else empty).
inline std::vector<Block> amx_blocks(const int64_t* prm, const Geometry& g, const int32_t* rowptr,
                                     const int32_t* cin, const int32_t* kpos, const uint16_t* val) {
  std::vector<Block> blocks;
  const int64_t taps = prm[P_KH] * prm[P_KW];
  if (!shared_blocks(rowptr, cin, kpos, prm[P_O], taps) || !pack_blocks(g, rowptr, cin, kpos, val, prm[P_O], taps, blocks))
    blocks.clear();
  return blocks;
}

// A dense conv with few outputs (EDSR's last conv, 64 -> 3), O * KW <= 16: its column taps folded
// into the tile rows. Row (o, dx) of C sums W[o][c][dy][dx] x[c][y + dy][q] over (c, dy), and
// out[o][x] = sum over dx of row (o, dx) at q = x + dx * dw, added up per output row from a row
// buffer. 9 of 16 rows busy instead of 3: a third of the K steps and of the gather (EDSR-baseline
// x2's last conv at 640x360: 2.4 ms against 3.7 ms as one block of 3 channels).
inline bool folded_block(const int64_t* prm, const Geometry& g, const int32_t* rowptr, const int32_t* cin,
                         const int32_t* kpos, const uint16_t* val, Block& bl) {
  const int64_t O = prm[P_O], KH = prm[P_KH], KW = prm[P_KW], C = g.C, taps = KH * KW;
  if (KW < 2 || O * KW > OB || O >= OB) return false;
  for (int64_t o = 0; o < O; ++o)
    if (rowptr[o + 1] - rowptr[o] != C * taps) return false;  // dense: every position kept
  std::vector<std::pair<int64_t, int64_t>> pos;               // (offset, c * KH + dy), in address order
  for (int64_t c = 0; c < C; ++c)
    for (int64_t dy = 0; dy < KH; ++dy) {
      const int64_t off = entry_offset(g, (int32_t)c, (int32_t)(dy * KW));
      if (off < 0) return false;
      pos.emplace_back(off, c * KH + dy);
    }
  std::sort(pos.begin(), pos.end());
  const int64_t n = C * KH;
  bl.pairs = (n + 1) / 2;
  bl.steps = (n + 31) / 32;
  bl.channels = O * KW;
  bl.permuted = bl.pairs > 2 * bl.channels;
  bl.off.resize(2 * bl.pairs);
  for (int64_t i = 0; i < 2 * bl.pairs; ++i) bl.off[i] = (int32_t)pos[std::min(i, n - 1)].first;
  std::vector<int64_t> slot(C * KH);  // (c, dy) -> its K index
  for (int64_t i = 0; i < n; ++i) slot[pos[i].second] = i;
  bl.a.assign(bl.steps * OB * 32, 0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = rowptr[o]; k < rowptr[o + 1]; ++k) {
      const int64_t dy = kpos[k] / KW, dx = kpos[k] % KW, i = slot[cin[k] * KH + dy];
      bl.a[(i / 32) * OB * 32 + (o * KW + dx) * 32 + i % 32] = val[k];
    }
  return true;
}

// One output row y of a folded conv (folded_block) from `xrow`, its padded input at that row: the
// tile sums of each row (o, dx) over columns q < Wo + (KW - 1) * dw go to `rows` (a row buffer of
// width_of(...) floats per tile row), then each output row adds its KW shifted rows.
inline int64_t folded_width(int64_t Wo, int64_t KW, int64_t dw) { return (Wo + (KW - 1) * dw + SEG - 1) / SEG * SEG; }

// A folded conv's output row from its (o, dx) sums `rows` (row stride folded_width): out[o][x] is the
// sum over dx of row (o, dx) at x + dx * dw, then the epilogue.
inline void fold_columns(const float* rows, int64_t O, int64_t KW, int64_t dw, int64_t Wo, float (&t)[OB][SEG],
                         const AmxSink& sink, int64_t b, int64_t y) {
  const int64_t width = folded_width(Wo, KW, dw);
  for (int64_t x0 = 0; x0 < Wo; x0 += SEG) {
    for (int64_t o = 0; o < O; ++o)
      for (int64_t c = 0; c < SEG; c += 16) {
        __m512 v = _mm512_loadu_ps(&rows[o * KW * width + x0 + c]);
        for (int64_t dx = 1; dx < KW; ++dx)
          v = _mm512_add_ps(v, _mm512_loadu_ps(&rows[(o * KW + dx) * width + x0 + c + dx * dw]));
        _mm512_store_ps(&t[o][c], v);
      }
    epilogue_any(t, sink, 1, b, 0, y, x0, std::min(SEG, Wo - x0), O, false);
  }
}

inline void folded_row(Worker& w, const std::vector<Block>& one, const uint16_t* xrow, int64_t O, int64_t KW,
                       int64_t dw, int64_t Wo, float* rows, float (&t)[OB][SEG], const AmxSink& sink, int64_t b,
                       int64_t y) {
  const int64_t span = Wo + (KW - 1) * dw, width = folded_width(Wo, KW, dw);
  for (int64_t q0 = 0; q0 < span; q0 += SEG)
    w.segment(xrow + q0, one, [&](float(&s)[OB][SEG], int64_t, bool perm) {
      if (perm) unpermute(s, O * KW);
      for (int64_t j = 0; j < O * KW; ++j) std::memcpy(&rows[j * width + q0], s[j], SEG * 4);
    });
  fold_columns(rows, O, KW, dw, Wo, t, sink, b, y);
}

// The folded conv (folded_block): each work item a band of whole output rows (folded_row).
inline bool folded_conv(const int64_t* prm, const Geometry& g, const uint16_t* xp, const int32_t* rowptr,
                        const int32_t* cin, const int32_t* kpos, const uint16_t* val, const AmxSink& sink,
                        int nthreads) {
  std::vector<Block> one(1);
  if (!folded_block(prm, g, rowptr, cin, kpos, val, one[0])) return false;
  const int64_t O = prm[P_O], KW = prm[P_KW], dw = prm[P_DW], width = folded_width(g.Wo, KW, dw);
  const int64_t bands = (g.Ho + BAND - 1) / BAND, items = g.B * bands, xstride = g.C * g.Wq;
#pragma omp parallel num_threads(nthreads)
  {
    Worker w;
    std::vector<float> rows(O * KW * width + SEG);  // row (o, dx): tile sums at q
    alignas(64) float t[OB][SEG];
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < items; ++n) {
      const int64_t b = n / bands, bd = n % bands;
      for (int64_t y = bd * BAND; y < std::min(g.Ho, (bd + 1) * BAND); ++y)
        folded_row(w, one, xp + b * g.per_b + y * xstride, O, KW, dw, g.Wo, rows.data(), t, sink, b, y);
    }
    if (sink.stream) _mm_sfence();
  }
  amx_convs.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// A 16-bit residual's row y, columns [c0, c1), of every output channel towards L2: a residual from
// long before (EDSR's long skip) comes from memory, and its 64 channel rows are more streams than
// the hardware prefetcher follows.
inline void prefetch_rows(const AmxSink& s, int64_t b, int64_t O, int64_t y, int64_t c0, int64_t c1) {
  const char* row = reinterpret_cast<const char*>(static_cast<const uint16_t*>(s.res) + b * s.rs.b + y * s.rs.h);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = c0 * 2; c < c1 * 2; c += 64) _mm_prefetch(row + o * s.rs.c * 2 + c, _MM_HINT_T1);
}

// The conv on AMX when it qualifies (stride 1, blocks of 16 channels sharing their positions, a
// fused shuffle's factor dividing 16, AMX granted); false: the caller runs the vector path.
inline bool conv(const int64_t* prm, const Geometry& g, const uint16_t* xp, const int32_t* rowptr, const int32_t* cin,
                 const int32_t* kpos, const uint16_t* val, const AmxSink& sink, int nthreads) {
  const int R = prm[P_SHUFFLE] > 1 ? (int)prm[P_SHUFFLE] : 1;
  const int64_t O = prm[P_O];
  if (prm[P_SH] != 1 || prm[P_SW] != 1 || OB % R != 0 || !amx_enabled()) return false;
  if (R == 1 && folded_conv(prm, g, xp, rowptr, cin, kpos, val, sink, nthreads)) return true;
  const std::vector<Block> blocks = amx_blocks(prm, g, rowptr, cin, kpos, val);
  if (blocks.empty()) return false;
  const int64_t segs = (g.Wo + SEG - 1) / SEG, chunks = (segs + CHUNK - 1) / CHUNK;
  const int64_t bands = (g.Ho + BAND - 1) / BAND;
  const int64_t items = g.B * bands * chunks, xstride = g.C * g.Wq;
#pragma omp parallel num_threads(nthreads)
  {
    Worker w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < items; ++n) {
      const int64_t b = n / (bands * chunks), bd = (n / chunks) % bands, ch = n % chunks;
      const int64_t c0 = ch * CHUNK * SEG, c1 = std::min(g.Wo, (ch + 1) * CHUNK * SEG);
      for (int64_t y = bd * BAND; y < std::min(g.Ho, (bd + 1) * BAND); ++y) {
        if (sink.res16 && y + 2 < g.Ho) prefetch_rows(sink, b, O, y + 2, c0, c1);
        for (int64_t x0 = c0; x0 < c1; x0 += SEG) {
          const int64_t ncols = std::min(SEG, g.Wo - x0);
          w.segment(xp + b * g.per_b + y * xstride + x0, blocks, [&](float(&t)[OB][SEG], int64_t o0, bool perm) {
            epilogue_any(t, sink, R, b, o0, y, x0, ncols, std::min(OB, O - o0), perm);
          });
        }
      }
    }
    if (sink.stream) _mm_sfence();
  }
  amx_convs.fetch_add(1, std::memory_order_relaxed);
  return true;
}

#endif  // NMK_AMX

}  // namespace nmk_amx
