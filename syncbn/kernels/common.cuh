// Shared by every SyncBatchNorm kernel family: dtypes, vector loads, reductions, per-channel constants.
//
// No CUDA header is included, so that NVRTC (CuPy's RawModule) and nvcc compile the same text
// without include paths: half and bfloat16 are 16-bit words converted with PTX instructions.
#pragma once

typedef long long i64;

// Dtype tags. storage: what a tensor holds; acc: what sums and elementwise arithmetic use
// (float32 for half precision, as torch does; float64 for float64).
struct F32 {};
struct F64 {};
struct F16 {};
struct BF16 {};

template <class D> struct Type;

template <> struct Type<F32> {
    typedef float storage;
    typedef float acc;
    static constexpr int vec = 4;  // elements per 16-byte load
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};

template <> struct Type<F64> {
    typedef double storage;
    typedef double acc;
    static constexpr int vec = 2;
    static __device__ __forceinline__ double load(double v) { return v; }
    static __device__ __forceinline__ double store(double v) { return v; }
};

template <> struct Type<F16> {
    typedef unsigned short storage;
    typedef float acc;
    static constexpr int vec = 8;
#ifdef SYNCBN_EMULATOR  // tests/cuda_emulator.py runs these kernels on CPU fibres: no PTX there
    static __device__ __forceinline__ float load(unsigned short h) { return syncbn_emulator::half_to_float(h); }
    static __device__ __forceinline__ unsigned short store(float f) { return syncbn_emulator::float_to_half(f); }
#else
    static __device__ __forceinline__ float load(unsigned short h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ unsigned short store(float f) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
#endif
};

template <> struct Type<BF16> {
    typedef unsigned short storage;
    typedef float acc;
    static constexpr int vec = 8;
    static __device__ __forceinline__ float load(unsigned short h) {
        return __uint_as_float(static_cast<unsigned int>(h) << 16);
    }
    static __device__ __forceinline__ unsigned short store(float f) {
#if __CUDA_ARCH__ >= 800
        unsigned short h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
#else  // no bfloat16 conversion instruction before sm_80: round to nearest even by hand
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return static_cast<unsigned short>(u >> 16);
#endif
    }
};

// Sixteen bytes of a tensor, read or written in one instruction.
struct alignas(16) Bytes16 {
    unsigned int x, y, z, w;
};
template <class D> union Pack {
    Bytes16 raw;
    typename Type<D>::storage v[Type<D>::vec];
};

// A running stored value read as double (running statistics keep the layer's dtype).
template <class D> __device__ __forceinline__ double load_double(typename Type<D>::storage v) {
    return static_cast<double>(Type<D>::load(v));
}
template <class D> __device__ __forceinline__ typename Type<D>::storage store_double(double v) {
    return Type<D>::store(static_cast<typename Type<D>::acc>(v));
}

// How the blocks of NCHW work cover one channel. A channel's elements are N rows of S (one per sample);
// each row is cut into `chunks` pieces of `chunk` loads, and the N * chunks pieces are dealt to the blocks
// of the channel (blockIdx.y of gridDim.y) and, within a block, to `rows` groups of 2^ts_bits threads that
// read a piece's consecutive loads together (coalesced). Short rows (7 x 7) use narrow groups; long rows
// with few samples (2 images of 112 x 112) are cut, so that a small batch still fills the device.
struct Tile {
    int column, columns, row, rows;
    __device__ __forceinline__ Tile(int threads, int ts_bits)
        : column(static_cast<int>(threadIdx.x) & ((1 << ts_bits) - 1)),
          columns(1 << ts_bits),
          row(static_cast<int>(threadIdx.x) >> ts_bits),
          rows(threads >> ts_bits) {}
};

// Calls f(n, i) for the loads i of sample n's row that this thread reads: i counts loads of one element,
// or of a vector when the kernel is vectorised (units = S / vector width then). N * chunks < 2^31
// (the launcher makes sure), so that the piece arithmetic stays in 32 bits.
template <class F>
__device__ __forceinline__ void for_each_load(const Tile& tile, int N, i64 units, int chunks, i64 chunk, F f) {
    const int pieces = N * chunks;
    for (int piece = static_cast<int>(blockIdx.y) * tile.rows + tile.row; piece < pieces;
         piece += static_cast<int>(gridDim.y) * tile.rows) {
        const int n = piece / chunks;
        const i64 begin = static_cast<i64>(piece - n * chunks) * chunk;
        const i64 end = begin + chunk < units ? begin + chunk : units;
        for (i64 i = begin + tile.column; i < end; i += tile.columns) f(static_cast<i64>(n), i);
    }
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// The sums of a and b over a 1-D block of THREADS threads; the result is valid in thread 0.
// shared: 2 * THREADS / 32 values. The block must not use shared again before a __syncthreads().
template <int THREADS, typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b, A* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
        shared[warp] = a;
        shared[THREADS / 32 + warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < THREADS / 32 ? shared[lane] : A(0);
        b = lane < THREADS / 32 ? shared[THREADS / 32 + lane] : A(0);
        a = warp_sum(a);
        b = warp_sum(b);
    }
}

// The sums of a and b over the rows (threadIdx.y) of a (32, ROWS) block, for each column
// (threadIdx.x); valid in row 0. shared: 2 * ROWS * 32 values.
template <int ROWS, typename A>
__device__ __forceinline__ void column_sum2(A& a, A& b, A* shared) {
    const int x = threadIdx.x, y = threadIdx.y;
    shared[y * 32 + x] = a;
    shared[(ROWS + y) * 32 + x] = b;
    __syncthreads();
    if (y == 0) {
        for (int row = 1; row < ROWS; ++row) {
            a += shared[row * 32 + x];
            b += shared[(ROWS + row) * 32 + x];
        }
    }
}

// The per-channel constants of x_hat = ((x - hi) - lo) * invstd, from norm = [mean (C), var (C), count]
// (float64). hi + lo is the mean split into two values of the arithmetic dtype: x - hi is exact when x is
// near the mean, so a mean 1e5 times the spread keeps the digits a single rounded mean would lose.
template <typename A> struct Centre {
    A hi, lo;
    double invstd;
    __device__ __forceinline__ Centre(const double* norm, int C, int c, double eps) {
        const double mean = norm[c];
        hi = static_cast<A>(mean);
        lo = static_cast<A>(mean - static_cast<double>(hi));
        invstd = rsqrt(norm[C + c] + eps);
    }
    __device__ __forceinline__ A centred(A x) const { return (x - hi) - lo; }
};
