// Prototype (speed only, not used by nmrestore): a 3x3 stride-1 conv whose N:M mask is shared by
// blocks of 16 output channels ("coarse" N:M: the 16 channels of a block keep the same N input
// channels of every M at each kernel position), run on AMX tiles. Built and timed by
// benchmarks/bench_coarse.py (and bench_speed.py --coarse) against the engine's per-channel N:M
// kernels and oneDNN's dense bf16 conv, alone and as a residual block with its epilogue fused.
//
// Why the coarse pattern can use AMX and per-channel N:M cannot: a tile product C[16 o][16 px] +=
// A[16 o][32 k] x B[32 k][16 px] needs the 16 output channels to read the same 32 inputs k. With
// a mask shared by the block, the block's kept inputs (N/M of C*9) form a dense K axis: A is the
// block's kept weights (packed once), B is gathered per pixel block from the kept input rows. The
// gather is the interleave of the bf16 kernel (vpunpck{l,h}wd of two input rows gives one B row
// for 16 pixels in a permuted order), paid once per block of 16 output channels instead of once per
// output channel. The epilogue undoes the pixel permutation.
//
// Layout: input bf16 (row, channel, column), zero-padded (one row above, `left` zero columns on
// the left), row width `width` elements; output f32 (row, channel, column), (H, O, W), the layout
// the next conv of this kind would read. W must be a multiple of 64.
//
// Where its time goes (64->64 at 320x180, 2 threads, interleaved, with an (O, H, W) output): left
// out, the epilogue (tile stores, the pixel un-permute, the f32 output) saves 66-69% of the time,
// the B-tile gather 45-54%, both 87%: the tile products are the least of it. An (O, H, W) output
// took 1.3-1.4x the time of this layout: a pixel block's 16 output rows go to 16 channel planes
// 230 KB apart there, to one 80 KB row here.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {
  static int ok = -1;
  if (ok < 0) ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok == 1;
}

}  // namespace

extern "C" {

// kidx: per output block, kpad entries (kh*3+kw)*C + c (padded entries repeat a valid one);
// apack: per block, kpad/32 A tiles of [16 o][32 k] bf16 (zero weights on padded k).
// Epilogue, fused: + bias, + residual (f32, (H, O, W), or null), ReLU when relu; then stored to
// out (f32, (H, O, W), or null) and to out16 (or null): a bf16 input for the next such conv, laid
// out as x is (H + 3 rows of O channels of `width` elements, interior from row 1, column `left`;
// its zero border written once by the caller).
// Returns 0, or -1 when AMX cannot be used.
int coarse_conv3x3(const uint16_t* x, int64_t C, int64_t H, int64_t W, int64_t width, int64_t left,
                   const int32_t* kidx, const uint16_t* apack, int64_t O, int64_t kpad, const float* bias,
                   const float* residual, int relu, float* out, uint16_t* out16, int nthreads) {
  if (!amx_permitted() || W % 64 || O % 16 || kpad % 32) return -1;
  const int64_t row = C * width, blocks = O / 16, steps = kpad / 32;
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma omp parallel num_threads(nthreads)
  {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    alignas(64) uint16_t bt[4][16][32];  // B tiles: (pixel half lo/hi) x (32-pixel group 0/1)
    alignas(64) float ct[4][16][16];
    // offset of every kept input of every block relative to output pixel (0, 0)
    std::vector<int64_t> base(blocks * kpad);
    for (int64_t k = 0; k < blocks * kpad; ++k) {
      const int64_t kp = kidx[k] / C, c = kidx[k] % C;
      base[k] = (kp / 3) * row + c * width + left - 1 + kp % 3;
    }
#pragma omp for schedule(static)
    for (int64_t y = 0; y < H; ++y) {
      for (int64_t xb = 0; xb < W; xb += 64) {
        const uint16_t* xo = x + y * row + xb;
        for (int64_t ob = 0; ob < blocks; ++ob) {
          const int64_t* off = base.data() + ob * kpad;
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t s = 0; s < steps; ++s) {
            for (int j = 0; j < 16; ++j) {
              const uint16_t* pa = xo + off[s * 32 + 2 * j];
              const uint16_t* pb = xo + off[s * 32 + 2 * j + 1];
              for (int g = 0; g < 2; ++g) {
                const __m512i a = _mm512_loadu_si512(pa + 32 * g), b = _mm512_loadu_si512(pb + 32 * g);
                _mm512_store_si512(bt[2 * g][j], _mm512_unpacklo_epi16(a, b));
                _mm512_store_si512(bt[2 * g + 1][j], _mm512_unpackhi_epi16(a, b));
              }
            }
            _tile_loadd(4, apack + (ob * steps + s) * 512, 64);
            _tile_loadd(5, bt[0], 64);
            _tile_loadd(6, bt[1], 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(5, bt[2], 64);
            _tile_loadd(6, bt[3], 64);
            _tile_dpbf16ps(2, 4, 5);
            _tile_dpbf16ps(3, 4, 6);
          }
          _tile_stored(0, ct[0], 64);
          _tile_stored(1, ct[1], 64);
          _tile_stored(2, ct[2], 64);
          _tile_stored(3, ct[3], 64);
          for (int r = 0; r < 16; ++r) {
            const int64_t o = ob * 16 + r, at = (y * O + o) * W + xb;
            const __m512 b = _mm512_set1_ps(bias ? bias[o] : 0.f), zero = _mm512_setzero_ps();
            for (int g = 0; g < 2; ++g) {
              const __m512 lo = _mm512_load_ps(ct[2 * g][r]), hi = _mm512_load_ps(ct[2 * g + 1][r]);
              __m512 v0 = _mm512_add_ps(_mm512_permutex2var_ps(lo, first, hi), b);
              __m512 v1 = _mm512_add_ps(_mm512_permutex2var_ps(lo, second, hi), b);
              if (residual) {
                v0 = _mm512_add_ps(v0, _mm512_loadu_ps(residual + at + 32 * g));
                v1 = _mm512_add_ps(v1, _mm512_loadu_ps(residual + at + 32 * g + 16));
              }
              if (relu) {
                v0 = _mm512_max_ps(v0, zero);
                v1 = _mm512_max_ps(v1, zero);
              }
              if (out) {
                _mm512_storeu_ps(out + at + 32 * g, v0);
                _mm512_storeu_ps(out + at + 32 * g + 16, v1);
              }
              if (out16)
                _mm512_storeu_si512(out16 + ((y + 1) * O + o) * width + left + xb + 32 * g,
                                    (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
            }
          }
        }
      }
    }
    _tile_release();
  }
  return 0;
}

}  // extern "C"
