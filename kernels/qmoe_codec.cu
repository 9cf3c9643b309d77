// qmoe_codec.cu - GPU decoding of the qmoe-rans format (docs/FORMAT.md), loaded by CuPy.
//
// One thread decodes one rANS segment (a fixed number of symbols; the last may be shorter). The
// decode tables (slot -> symbol, frequencies, cumulative frequencies, symbol -> packed codes) sit in
// dynamic shared memory, loaded once per block. Any shape works: a segment's first weight index is
// seg * segment_symbols * group, and row/column are tracked incrementally from there.
//
// Kernels (extern "C", no headers needed so NVRTC and nvcc both compile this file alone):
//   qmoe_decode_codes     -> int8 codes (ternary -1/0/+1, int2 0..3)
//   qmoe_decode_ternary_bf16 / qmoe_decode_int2_bf16 -> bf16 weights (bits in uint16)
//       ternary: value = hi[row] if +1, lo[row] if -1, else 0
//       int2:    value = scale[row] * (q - zero[row]) in fp32, rounded to bf16 (nearest even)
//   qmoe_matvec_{ternary,int2}_b{1,2,4,8,16} -> y[B, rows] (fp32, must be zeroed) += W x[B, cols]^T,
//       x in bf16 bits, fp32 accumulation, one atomicAdd per (row piece, token) per segment.
// Safety: the host validates every size and offset before launch; in the kernel every stream read
// is bounded by the segment's end, and a segment that reads past its end or does not return to
// the initial state sets *err (the host then raises instead of returning the output).

#define RANS_L 65536u

struct Tables {
  unsigned char* slot_sym;      // [1 << prob_bits]
  unsigned int* freq;           // [nsymbols]
  unsigned int* cum;            // [nsymbols]
  unsigned long long* expand;   // [nsymbols], byte j = code of weight j (int8)
};

__device__ __forceinline__ Tables load_tables(const unsigned char* g_slot_sym,
                                              const unsigned short* g_freq,
                                              const unsigned long long* g_expand, int nsymbols,
                                              int prob_bits) {
  extern __shared__ unsigned long long smem_u64[];
  Tables t;
  t.expand = smem_u64;                                              // 8 * 256 bytes
  t.freq = reinterpret_cast<unsigned int*>(smem_u64 + 256);        // 4 * 256
  t.cum = t.freq + 256;                                             // 4 * 256
  t.slot_sym = reinterpret_cast<unsigned char*>(t.cum + 256);      // 1 << prob_bits
  const int M = 1 << prob_bits;
  for (int i = threadIdx.x; i < nsymbols; i += blockDim.x) {
    t.expand[i] = g_expand[i];
    t.freq[i] = g_freq[i];
  }
  const unsigned int* src = reinterpret_cast<const unsigned int*>(g_slot_sym);
  unsigned int* dst = reinterpret_cast<unsigned int*>(t.slot_sym);
  for (int i = threadIdx.x; i < (M >> 2); i += blockDim.x) dst[i] = src[i];
  __syncthreads();
  // cumulative frequencies: inclusive scan by one warp is enough for <= 256 symbols
  if (threadIdx.x == 0) {
    unsigned int c = 0;
    for (int i = 0; i < nsymbols; ++i) {
      t.cum[i] = c;
      c += t.freq[i];
    }
  }
  __syncthreads();
  return t;
}

__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
  unsigned int u = __float_as_uint(f);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (finite inputs)
  return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short b) {
  return __uint_as_float(((unsigned int)b) << 16);
}

struct Segment {
  unsigned int x;
  long long pos, end;
  long long s0, s1;
  bool bad;
};

__device__ __forceinline__ Segment open_segment(const unsigned short* stream,
                                                const long long* seg_start, long long seg,
                                                int seg_sym, long long n_sym) {
  Segment g;
  long long st = seg_start[seg];
  g.end = seg_start[seg + 1];
  g.x = ((unsigned int)stream[st] << 16) | (unsigned int)stream[st + 1];
  g.pos = st + 2;
  g.s0 = seg * (long long)seg_sym;
  g.s1 = min(g.s0 + (long long)seg_sym, n_sym);
  g.bad = false;
  return g;
}

__device__ __forceinline__ int next_symbol(Segment& g, const Tables& t,
                                           const unsigned short* stream, int prob_bits) {
  const unsigned int mask = (1u << prob_bits) - 1u;
  unsigned int slot = g.x & mask;
  int s = t.slot_sym[slot];
  g.x = t.freq[s] * (g.x >> prob_bits) + slot - t.cum[s];
  if (g.x < RANS_L) {
    if (g.pos < g.end) {
      g.x = (g.x << 16) | (unsigned int)stream[g.pos];
      ++g.pos;
    } else {
      g.bad = true;
    }
  }
  return s;
}

// MODE 0: int8 codes; 1: ternary -> bf16 (p0 = lo, p1 = hi); 2: int2 -> bf16 (p0 = scale, p1 = zero)
template <int MODE>
__device__ void decode_impl(const unsigned short* stream, const long long* seg_start, long long nseg,
                            int seg_sym, long long n_sym, long long n_weights, long long cols,
                            const unsigned char* g_slot_sym, const unsigned short* g_freq,
                            const unsigned long long* g_expand, int nsymbols, int prob_bits,
                            int group, const float* p0, const float* p1, void* out, int* err) {
  Tables t = load_tables(g_slot_sym, g_freq, g_expand, nsymbols, prob_bits);
  long long seg = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (seg >= nseg) return;
  Segment g = open_segment(stream, seg_start, seg, seg_sym, n_sym);
  long long w = g.s0 * group;
  long long row = w / cols, col = w - row * cols;
  float a = 0.f, b = 0.f;
  if (MODE != 0 && row * cols < n_weights) { a = p0[row]; b = p1[row]; }
  for (long long i = g.s0; i < g.s1 && !g.bad; ++i) {
    int s = next_symbol(g, t, stream, prob_bits);
    unsigned long long e = t.expand[s];
    for (int j = 0; j < group && w < n_weights; ++j, ++w) {
      signed char c = (signed char)((e >> (8 * j)) & 0xFFu);
      if (MODE == 0) {
        reinterpret_cast<signed char*>(out)[w] = c;
      } else if (MODE == 1) {
        float v = c > 0 ? b : (c < 0 ? a : 0.f);
        reinterpret_cast<unsigned short*>(out)[w] = f32_to_bf16_bits(v);
      } else {
        float v = a * ((float)c - b);
        reinterpret_cast<unsigned short*>(out)[w] = f32_to_bf16_bits(v);
      }
      if (++col == cols) {
        col = 0;
        ++row;
        if (MODE != 0 && w + 1 < n_weights) { a = p0[row]; b = p1[row]; }
      }
    }
  }
  if (g.bad || g.x != RANS_L || g.pos != g.end) atomicOr(err, 1);
}

#define DECODE_ARGS                                                                             \
  const unsigned short *stream, const long long *seg_start, long long nseg, int seg_sym,       \
      long long n_sym, long long n_weights, long long cols, const unsigned char *slot_sym,     \
      const unsigned short *freq, const unsigned long long *expand, int nsymbols, int prob_bits, \
      int group, const float *p0, const float *p1, void *out, int *err
#define DECODE_PASS                                                                            \
  stream, seg_start, nseg, seg_sym, n_sym, n_weights, cols, slot_sym, freq, expand, nsymbols, \
      prob_bits, group, p0, p1, out, err

extern "C" __global__ void qmoe_decode_codes(DECODE_ARGS) { decode_impl<0>(DECODE_PASS); }
extern "C" __global__ void qmoe_decode_ternary_bf16(DECODE_ARGS) { decode_impl<1>(DECODE_PASS); }
extern "C" __global__ void qmoe_decode_int2_bf16(DECODE_ARGS) { decode_impl<2>(DECODE_PASS); }

// Fused decode + product. KIND 1: ternary (p0 = lo, p1 = hi); KIND 2: int2 (p0 = scale, p1 = zero).
template <int KIND, int B>
__device__ __forceinline__ void flush_row(float* y, long long rows, long long row, const float* p0,
                                          const float* p1, float (&acc0)[B], float (&acc1)[B]) {
  float a = p0[row], b = p1[row];
#pragma unroll
  for (int k = 0; k < B; ++k) {
    // ternary: hi * sum(x | +1) + lo * sum(x | -1); int2: scale * (sum(q x) - zero * sum(x))
    float v = KIND == 1 ? b * acc0[k] + a * acc1[k] : a * (acc0[k] - b * acc1[k]);
    if (acc0[k] != 0.f || acc1[k] != 0.f) atomicAdd(&y[k * rows + row], v);
    acc0[k] = 0.f;
    acc1[k] = 0.f;
  }
}

template <int KIND, int B>
__device__ void matvec_impl(const unsigned short* stream, const long long* seg_start, long long nseg,
                            int seg_sym, long long n_sym, long long rows, long long cols,
                            const unsigned char* g_slot_sym, const unsigned short* g_freq,
                            const unsigned long long* g_expand, int nsymbols, int prob_bits,
                            int group, const float* p0, const float* p1, const unsigned short* x,
                            float* y, int* err) {
  Tables t = load_tables(g_slot_sym, g_freq, g_expand, nsymbols, prob_bits);
  long long seg = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (seg >= nseg) return;
  const long long n_weights = rows * cols;
  Segment g = open_segment(stream, seg_start, seg, seg_sym, n_sym);
  long long w = g.s0 * group;
  long long row = w / cols, col = w - row * cols;
  float acc0[B], acc1[B];
#pragma unroll
  for (int k = 0; k < B; ++k) { acc0[k] = 0.f; acc1[k] = 0.f; }
  for (long long i = g.s0; i < g.s1 && !g.bad; ++i) {
    int s = next_symbol(g, t, stream, prob_bits);
    unsigned long long e = t.expand[s];
    if (KIND == 1 && e == 0ull && col + group < cols) {  // all-zero symbol inside one row
      w += group;
      col += group;
      continue;
    }
    for (int j = 0; j < group && w < n_weights; ++j, ++w) {
      signed char c = (signed char)((e >> (8 * j)) & 0xFFu);
      if (KIND == 1) {
        if (c != 0) {
#pragma unroll
          for (int k = 0; k < B; ++k) {
            float xv = bf16_bits_to_f32(x[k * cols + col]);
            if (c > 0) acc0[k] += xv; else acc1[k] += xv;
          }
        }
      } else {
        float q = (float)c;
#pragma unroll
        for (int k = 0; k < B; ++k) {
          float xv = bf16_bits_to_f32(x[k * cols + col]);
          acc0[k] += q * xv;
          acc1[k] += xv;
        }
      }
      if (++col == cols) {
        flush_row<KIND, B>(y, rows, row, p0, p1, acc0, acc1);
        col = 0;
        ++row;
      }
    }
  }
  if (col != 0 && row < rows) flush_row<KIND, B>(y, rows, row, p0, p1, acc0, acc1);
  if (g.bad || g.x != RANS_L || g.pos != g.end) atomicOr(err, 1);
}

#define MATVEC_ARGS                                                                             \
  const unsigned short *stream, const long long *seg_start, long long nseg, int seg_sym,       \
      long long n_sym, long long rows, long long cols, const unsigned char *slot_sym,          \
      const unsigned short *freq, const unsigned long long *expand, int nsymbols, int prob_bits, \
      int group, const float *p0, const float *p1, const unsigned short *x, float *y, int *err
#define MATVEC_PASS                                                                          \
  stream, seg_start, nseg, seg_sym, n_sym, rows, cols, slot_sym, freq, expand, nsymbols,    \
      prob_bits, group, p0, p1, x, y, err
#define MATVEC_KERNELS(B)                                                                     \
  extern "C" __global__ void qmoe_matvec_ternary_b##B(MATVEC_ARGS) {                          \
    matvec_impl<1, B>(MATVEC_PASS);                                                           \
  }                                                                                           \
  extern "C" __global__ void qmoe_matvec_int2_b##B(MATVEC_ARGS) { matvec_impl<2, B>(MATVEC_PASS); }

// Token counts between instantiations are padded up by the host (zero rows of x).
MATVEC_KERNELS(1)
MATVEC_KERNELS(2)
MATVEC_KERNELS(4)
MATVEC_KERNELS(8)
MATVEC_KERNELS(16)
