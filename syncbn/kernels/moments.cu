// Forward: this rank's per-channel sums, straight into the all-reduce payload.
//
// payload (float64, 2C + 4) = [C, C^2, sum x (C), sum x^2 (C), count, runs backward].
//
// Every thread accumulates d = x - K and d^2 in the arithmetic dtype (float32 for half, bfloat16 and
// float32 input), K being the channel's first element: a value of the batch, so within a few standard
// deviations of the mean, and the sums of d do not cancel even when the mean is 1e5 times the spread.
// Blocks write their sums in float64 to a workspace; the merge kernel adds them in float64 and moves
// them back to raw sums (sum x = n K + sum d, sum x^2 = sum d^2 + 2 K sum d + n K^2) for the payload.
//
// Passes: one read of x (the merge reads one element per channel). No transpose: NCHW and NHWC each
// have their own reduction kernel.
#include "common.cuh"

namespace {

constexpr int THREADS = 256;  // NCHW: one channel per block (blockIdx.x), splits of the batch (blockIdx.y)
constexpr int ROWS = 8;       // NHWC: 32 channels x 8 rows per block

// Reads: x (N, C, S) contiguous; x[c * S] (K). Writes: partial[split][c][2] (float64).
// One pass over x; vectorised 16-byte loads when vec (S a multiple of the vector width, x aligned).
template <class D>
__device__ void moments_nchw(const typename Type<D>::storage* __restrict__ x, int N, int C, i64 S, int ts_bits,
                             int vec, int chunks, i64 chunk, double* __restrict__ partial) {
    typedef typename Type<D>::acc A;
    __shared__ A shared[2 * THREADS / 32];
    const int c = blockIdx.x;
    const Tile tile(THREADS, ts_bits);
    const A K = Type<D>::load(x[static_cast<i64>(c) * S]);
    A sum = 0, sum_sq = 0;
    if (vec) {
        for_each_load(tile, N, S / Type<D>::vec, chunks, chunk, [&](i64 n, i64 i) {
            Pack<D> p;
            p.raw = reinterpret_cast<const Bytes16*>(x + (n * C + c) * S)[i];
#pragma unroll
            for (int k = 0; k < Type<D>::vec; ++k) {
                const A d = Type<D>::load(p.v[k]) - K;
                sum += d;
                sum_sq += d * d;
            }
        });
    } else {
        for_each_load(tile, N, S, chunks, chunk, [&](i64 n, i64 i) {
            const A d = Type<D>::load(x[(n * C + c) * S + i]) - K;
            sum += d;
            sum_sq += d * d;
        });
    }
    block_sum2<THREADS>(sum, sum_sq, shared);
    if (threadIdx.x == 0) {
        partial[(static_cast<i64>(blockIdx.y) * C + c) * 2] = static_cast<double>(sum);
        partial[(static_cast<i64>(blockIdx.y) * C + c) * 2 + 1] = static_cast<double>(sum_sq);
    }
}

// Reads: x (M, C) row-major (channels last, M = N * spatial); x[c] (K). Writes: partial[split][c][2].
// One pass over x, each warp reading 32 neighbouring channels of a row.
template <class D>
__device__ void moments_nhwc(const typename Type<D>::storage* __restrict__ x, i64 M, int C,
                             double* __restrict__ partial) {
    typedef typename Type<D>::acc A;
    __shared__ A shared[2 * ROWS * 32];
    const int c = blockIdx.x * 32 + threadIdx.x, split = blockIdx.y, splits = gridDim.y;
    A sum = 0, sum_sq = 0;
    if (c < C) {
        const A K = Type<D>::load(x[c]);
        for (i64 m = static_cast<i64>(split) * ROWS + threadIdx.y; m < M; m += static_cast<i64>(splits) * ROWS) {
            const A d = Type<D>::load(x[m * C + c]) - K;
            sum += d;
            sum_sq += d * d;
        }
    }
    column_sum2<ROWS>(sum, sum_sq, shared);
    if (threadIdx.y == 0 && c < C) {
        partial[(static_cast<i64>(split) * C + c) * 2] = static_cast<double>(sum);
        partial[(static_cast<i64>(split) * C + c) * 2 + 1] = static_cast<double>(sum_sq);
    }
}

// Reads: partial[splits][C][2], x[c * k_stride] (K). Writes: payload (2C + 4). One thread per channel.
template <class D>
__device__ void moments_merge(const typename Type<D>::storage* __restrict__ x, i64 k_stride,
                              const double* __restrict__ partial, int splits, int C, double count,
                              double runs_backward, double* __restrict__ payload) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c == 0) {
        payload[0] = C;
        payload[1] = static_cast<double>(C) * C;
        payload[2 * C + 2] = count;
        payload[2 * C + 3] = runs_backward;
    }
    if (c >= C) return;
    double sum = 0, sum_sq = 0;
    for (int split = 0; split < splits; ++split) {
        sum += partial[(static_cast<i64>(split) * C + c) * 2];
        sum_sq += partial[(static_cast<i64>(split) * C + c) * 2 + 1];
    }
    const double K = load_double<D>(x[c * k_stride]);
    payload[2 + c] = count * K + sum;
    payload[2 + C + c] = sum_sq + 2.0 * K * sum + count * K * K;
}

}  // namespace

#define SYNCBN_MOMENTS(NAME, D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) syncbn_moments_nchw_##NAME(                            \
        const Type<D>::storage* __restrict__ x, int N, int C, i64 S, int ts_bits, int vec, int chunks,           \
        i64 chunk, double* __restrict__ partial) {                                                               \
        moments_nchw<D>(x, N, C, S, ts_bits, vec, chunks, chunk, partial);                                       \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * ROWS) syncbn_moments_nhwc_##NAME(                          \
        const Type<D>::storage* __restrict__ x, i64 M, int C, double* __restrict__ partial) {                    \
        moments_nhwc<D>(x, M, C, partial);                                                                       \
    }                                                                                                            \
    extern "C" __global__ void syncbn_moments_merge_##NAME(                                                      \
        const Type<D>::storage* __restrict__ x, i64 k_stride, const double* __restrict__ partial, int splits,    \
        int C, double count, double runs_backward, double* __restrict__ payload) {                               \
        moments_merge<D>(x, k_stride, partial, splits, C, count, runs_backward, payload);                        \
    }

SYNCBN_MOMENTS(f32, F32)
SYNCBN_MOMENTS(f64, F64)
SYNCBN_MOMENTS(f16, F16)
SYNCBN_MOMENTS(bf16, BF16)
