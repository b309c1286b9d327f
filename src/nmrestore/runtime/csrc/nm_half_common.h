// Shared by the 16-bit kernels (nm_bf16.cpp, nm_fp16.cpp): stores that may bypass the caches, and the
// fused pixel shuffle's write of R conv channels into one high-resolution row. AVX-512 only: both
// kernels are compiled in only where the compiler targets it.
#pragma once
#include "nm_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace nmk {

// Stores bypassing the caches when asked and the address is aligned, else ordinary ones.
inline void put16(float* p, __mmask16 m, __m512 v, bool stream) {
  if (stream && m == 0xffff && (reinterpret_cast<uintptr_t>(p) & 63) == 0)
    _mm512_stream_ps(p, v);
  else
    _mm512_mask_storeu_ps(p, m, v);
}
inline void put16h(uint16_t* p, __mmask16 m, __m256i v, bool stream) {
  if (stream && m == 0xffff && (reinterpret_cast<uintptr_t>(p) & 31) == 0)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  else
    _mm256_mask_storeu_epi16(p, m, v);
}

// One high-resolution row of a fused pixel shuffle of factor R: `ncols` columns of each of the R conv
// channels of one (c, i) (f32, `rows[j]` 64-byte aligned) interleaved into `df` (f32) and/or `dh`
// (16 bits: `to16` converts 16 values, `to16_one` one).
template <typename To16, typename To16One>
inline void shuffle_row(const float* const* rows, int R, int ncols, float* df, uint16_t* dh, bool stream, To16 to16,
                        To16One to16_one) {
  int l = 0;
  if (R == 2) {  // the common x2 upsampler: interleave 16 + 16 columns with two permutes
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; l + 16 <= ncols; l += 16) {
      const __m512 a = _mm512_load_ps(rows[0] + l), b = _mm512_load_ps(rows[1] + l);
      const __m512 u = _mm512_permutex2var_ps(a, lo, b), w = _mm512_permutex2var_ps(a, hi, b);
      if (df) put16(df + 2 * l, 0xffff, u, stream), put16(df + 2 * l + 16, 0xffff, w, stream);
      if (dh) put16h(dh + 2 * l, 0xffff, to16(u), stream), put16h(dh + 2 * l + 16, 0xffff, to16(w), stream);
    }
  }
  for (; l < ncols; ++l)
    for (int j = 0; j < R; ++j) {
      const float v = rows[j][l];
      if (df) df[l * R + j] = v;
      if (dh) dh[l * R + j] = to16_one(v);
    }
}

}  // namespace nmk

#endif
