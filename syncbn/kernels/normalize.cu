// Forward after the all-reduce: the global statistics, the running statistics, and y.
//
// syncbn_stats_finalize_<dtype of the running statistics>: reads the summed payload (float64,
// [C, C^2, sum x, sum x^2, count, runs backward]); writes norm = [mean (C), biased var (C), count]
// (float64) and, when asked, the running statistics (unbiased variance, global count) and
// num_batches_tracked. One block: every thread reads num_batches_tracked before thread 0 adds 1.
//
// syncbn_normalize_<layout>_<dtype>: y = ((x - hi) - lo) * (weight * invstd) + bias, the per-channel
// constants computed in each thread's prologue from norm (no separate kernel, no workspace).
// Reads x once, writes y once, in x's dtype and layout.
#include "common.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int ROWS = 8;

// Reads: payload; running_mean, running_var (the layer's dtype R; null when not updated).
// Writes: norm; running_mean, running_var, *num_batches_tracked. momentum < 0: cumulative average.
template <class R>
__device__ void stats_finalize(const double* __restrict__ payload, int C, double* __restrict__ norm,
                               typename Type<R>::storage* __restrict__ running_mean,
                               typename Type<R>::storage* __restrict__ running_var,
                               i64* __restrict__ num_batches_tracked, double momentum) {
    const double count = payload[2 * C + 2];
    // An all-empty group has count 0: divide by 1, so that every statistic is a finite 0.
    const double safe_count = count > 1.0 ? count : 1.0;
    const i64 tracked = num_batches_tracked != nullptr ? *num_batches_tracked : 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        norm[2 * C] = count;
        if (num_batches_tracked != nullptr) *num_batches_tracked = tracked + 1;
    }
    const double factor = momentum >= 0.0 ? momentum : 1.0 / static_cast<double>(tracked + 1);
    const bool update = running_mean != nullptr && count > 0.0;  // nothing moves when the group saw no value
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const double mean = payload[2 + c] / safe_count;
        double m2 = payload[2 + C + c] - payload[2 + c] * mean;
        m2 = m2 < 0.0 ? 0.0 : m2;  // NaN stays NaN, as in nn.BatchNorm
        norm[c] = mean;
        norm[C + c] = m2 / safe_count;
        if (update) {
            const double unbiased = m2 / (count > 2.0 ? count - 1.0 : 1.0);
            const double old_mean = load_double<R>(running_mean[c]), old_var = load_double<R>(running_var[c]);
            running_mean[c] = store_double<R>(old_mean + factor * (mean - old_mean));
            running_var[c] = store_double<R>(old_var + factor * (unbiased - old_var));
        }
    }
}

// The affine map of one channel: y = centred(x) * scale + shift.
template <class D> struct Affine {
    typedef typename Type<D>::acc A;
    Centre<A> centre;
    A scale, shift;
    __device__ __forceinline__ Affine(const double* norm, const A* weight, const A* bias, int C, int c, double eps)
        : centre(norm, C, c, eps) {
        const double w = weight != nullptr ? static_cast<double>(weight[c]) : 1.0;
        scale = static_cast<A>(w * centre.invstd);
        shift = bias != nullptr ? bias[c] : A(0);
    }
    __device__ __forceinline__ typename Type<D>::storage operator()(typename Type<D>::storage x) const {
        return Type<D>::store(centre.centred(Type<D>::load(x)) * scale + shift);
    }
};

// Reads x (N, C, S) contiguous; writes y. Block (THREADS): channel blockIdx.x, its rows dealt out as
// the moments kernel deals them (Tile). 16-byte loads and stores when vec.
template <class D>
__device__ void normalize_nchw(const typename Type<D>::storage* __restrict__ x, typename Type<D>::storage* __restrict__ y,
                               const double* __restrict__ norm, const typename Type<D>::acc* __restrict__ weight,
                               const typename Type<D>::acc* __restrict__ bias, int N, int C, i64 S, double eps,
                               int ts_bits, int vec, int chunks, i64 chunk) {
    const int c = blockIdx.x;
    const Tile tile(THREADS, ts_bits);
    const Affine<D> affine(norm, weight, bias, C, c, eps);
    if (vec) {
        for_each_load(tile, N, S / Type<D>::vec, chunks, chunk, [=](i64 n, i64 i) {
            const i64 offset = (n * C + c) * S;
            Pack<D> p;
            p.raw = reinterpret_cast<const Bytes16*>(x + offset)[i];
#pragma unroll
            for (int k = 0; k < Type<D>::vec; ++k) p.v[k] = affine(p.v[k]);
            reinterpret_cast<Bytes16*>(y + offset)[i] = p.raw;
        });
    } else {
        for_each_load(tile, N, S, chunks, chunk, [=](i64 n, i64 i) {
            const i64 at = (n * C + c) * S + i;
            y[at] = affine(x[at]);
        });
    }
}

// Reads x (M, C) row-major (channels last); writes y. Block (32, ROWS): 32 channels per blockIdx.x.
template <class D>
__device__ void normalize_nhwc(const typename Type<D>::storage* __restrict__ x, typename Type<D>::storage* __restrict__ y,
                               const double* __restrict__ norm, const typename Type<D>::acc* __restrict__ weight,
                               const typename Type<D>::acc* __restrict__ bias, i64 M, int C, double eps) {
    const int c = blockIdx.x * 32 + threadIdx.x;
    if (c >= C) return;
    const Affine<D> affine(norm, weight, bias, C, c, eps);
    for (i64 m = static_cast<i64>(blockIdx.y) * ROWS + threadIdx.y; m < M; m += static_cast<i64>(gridDim.y) * ROWS)
        y[m * C + c] = affine(x[m * C + c]);
}

}  // namespace

#define SYNCBN_FINALIZE(NAME, R)                                                                             \
    extern "C" __global__ void __launch_bounds__(1024) syncbn_stats_finalize_##NAME(                          \
        const double* __restrict__ payload, int C, double* __restrict__ norm,                                  \
        Type<R>::storage* __restrict__ running_mean, Type<R>::storage* __restrict__ running_var,               \
        i64* __restrict__ num_batches_tracked, double momentum) {                                            \
        stats_finalize<R>(payload, C, norm, running_mean, running_var, num_batches_tracked, momentum);       \
    }

#define SYNCBN_NORMALIZE(NAME, D)                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS) syncbn_normalize_nchw_##NAME(                      \
        const Type<D>::storage* __restrict__ x, Type<D>::storage* __restrict__ y, const double* __restrict__ norm, \
        const Type<D>::acc* __restrict__ weight, const Type<D>::acc* __restrict__ bias, int N, int C, i64 S,        \
        double eps, int ts_bits, int vec, int chunks, i64 chunk) {                                           \
        normalize_nchw<D>(x, y, norm, weight, bias, N, C, S, eps, ts_bits, vec, chunks, chunk);              \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * ROWS) syncbn_normalize_nhwc_##NAME(                    \
        const Type<D>::storage* __restrict__ x, Type<D>::storage* __restrict__ y, const double* __restrict__ norm, \
        const Type<D>::acc* __restrict__ weight, const Type<D>::acc* __restrict__ bias, i64 M, int C, double eps) { \
        normalize_nhwc<D>(x, y, norm, weight, bias, M, C, eps);                                              \
    }

SYNCBN_FINALIZE(f32, F32)
SYNCBN_FINALIZE(f64, F64)
SYNCBN_FINALIZE(f16, F16)
SYNCBN_FINALIZE(bf16, BF16)
SYNCBN_NORMALIZE(f32, F32)
SYNCBN_NORMALIZE(f64, F64)
SYNCBN_NORMALIZE(f16, F16)
SYNCBN_NORMALIZE(bf16, BF16)
