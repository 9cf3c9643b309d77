// cuda_host_shim.h - compile kernels/qmoe_codec.cu as plain C++ for the host-emulation tests.
//
// Each kernel then runs one CUDA thread per call: the test sets blockIdx/blockDim/threadIdx with
// qmoe_host_set_thread and calls the kernel once per segment, with blockDim.x = 1 so every thread
// loads the whole decode table itself (there is no other thread to share the work, and
// __syncthreads has nothing to wait for). Atomics become plain read-modify-writes (one thread at
// a time). What this checks: the kernels' indexing, table layout, rounding and corruption flags,
// with the host wrapper's own arguments; not warp behaviour, shared-memory limits or speed.
#include <cstring>
#include <algorithm>

struct qmoe_dim3 { unsigned int x, y, z; };
static qmoe_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1};

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __syncthreads() ((void)0)

// the largest table the kernels take (prob_bits <= 15), 8-byte aligned like CUDA's shared memory
unsigned long long smem_u64[(8 * 256 + 4 * 256 * 2 + (1 << 15)) / 8];

static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline int atomicOr(int* p, int v) { int o = *p; *p |= v; return o; }
static inline float atomicAdd(float* p, float v) { float o = *p; *p += v; return o; }
using std::min;

extern "C" void qmoe_host_set_thread(unsigned int block, unsigned int block_dim, unsigned int thread) {
  blockIdx.x = block;
  blockDim.x = block_dim;
  threadIdx.x = thread;
}
