// Backward: the per-channel sums for the all-reduce, then the input gradient.
//
// syncbn_backward_reduce_<layout>_<dtype>: sum(dy) and sum(dy * (x - mean)) per channel, the centring
// exact as in the forward (x - hi - lo); one pass reading x and dy; block sums in float64 to a workspace.
// syncbn_backward_merge_<arithmetic dtype>: adds the blocks' sums; writes sums = [sum dy (C),
// sum dy * x_hat (C)] in the arithmetic dtype (what the all-reduce and the weight and bias gradients use).
// syncbn_backward_elemt_<layout>_<dtype>: dx = scale * dy - k1 * (x - mean) - k0 with, per channel,
// scale = weight * invstd, k1 = scale * invstd * mean(dy * x_hat), k0 = scale * mean(dy) (global means
// from the summed sums and the global count in norm), computed in each thread's prologue.
// One pass reading x and dy, writing dx. dy has x's layout (the launcher makes it so).
#include "common.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int ROWS = 8;

template <class D>
__device__ void backward_reduce_nchw(const typename Type<D>::storage* __restrict__ x,
                                     const typename Type<D>::storage* __restrict__ dy, const double* __restrict__ norm,
                                     int N, int C, i64 S, double eps, int ts_bits, int vec, int chunks, i64 chunk,
                                     double* __restrict__ partial) {
    typedef typename Type<D>::acc A;
    __shared__ A shared[2 * THREADS / 32];
    const int c = blockIdx.x;
    const Tile tile(THREADS, ts_bits);
    const Centre<A> centre(norm, C, c, eps);
    A sum_dy = 0, sum_dy_c = 0;
    if (vec) {
        for_each_load(tile, N, S / Type<D>::vec, chunks, chunk, [&](i64 n, i64 i) {
            const i64 offset = (n * C + c) * S;
            Pack<D> px, pg;
            px.raw = reinterpret_cast<const Bytes16*>(x + offset)[i];
            pg.raw = reinterpret_cast<const Bytes16*>(dy + offset)[i];
#pragma unroll
            for (int k = 0; k < Type<D>::vec; ++k) {
                const A g = Type<D>::load(pg.v[k]);
                sum_dy += g;
                sum_dy_c += g * centre.centred(Type<D>::load(px.v[k]));
            }
        });
    } else {
        for_each_load(tile, N, S, chunks, chunk, [&](i64 n, i64 i) {
            const i64 at = (n * C + c) * S + i;
            const A g = Type<D>::load(dy[at]);
            sum_dy += g;
            sum_dy_c += g * centre.centred(Type<D>::load(x[at]));
        });
    }
    block_sum2<THREADS>(sum_dy, sum_dy_c, shared);
    if (threadIdx.x == 0) {
        partial[(static_cast<i64>(blockIdx.y) * C + c) * 2] = static_cast<double>(sum_dy);
        partial[(static_cast<i64>(blockIdx.y) * C + c) * 2 + 1] = static_cast<double>(sum_dy_c);
    }
}

template <class D>
__device__ void backward_reduce_nhwc(const typename Type<D>::storage* __restrict__ x,
                                     const typename Type<D>::storage* __restrict__ dy, const double* __restrict__ norm,
                                     i64 M, int C, double eps, double* __restrict__ partial) {
    typedef typename Type<D>::acc A;
    __shared__ A shared[2 * ROWS * 32];
    const int c = blockIdx.x * 32 + threadIdx.x, split = blockIdx.y, splits = gridDim.y;
    A sum_dy = 0, sum_dy_c = 0;
    if (c < C) {
        const Centre<A> centre(norm, C, c, eps);
        for (i64 m = static_cast<i64>(split) * ROWS + threadIdx.y; m < M; m += static_cast<i64>(splits) * ROWS) {
            const A g = Type<D>::load(dy[m * C + c]);
            sum_dy += g;
            sum_dy_c += g * centre.centred(Type<D>::load(x[m * C + c]));
        }
    }
    column_sum2<ROWS>(sum_dy, sum_dy_c, shared);
    if (threadIdx.y == 0 && c < C) {
        partial[(static_cast<i64>(split) * C + c) * 2] = static_cast<double>(sum_dy);
        partial[(static_cast<i64>(split) * C + c) * 2 + 1] = static_cast<double>(sum_dy_c);
    }
}

// Reads partial[splits][C][2], norm. Writes sums (2C) in the arithmetic dtype A. One thread per channel.
template <typename A>
__device__ void backward_merge(const double* __restrict__ partial, int splits, int C, const double* __restrict__ norm,
                               double eps, A* __restrict__ sums) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sum_dy = 0, sum_dy_c = 0;
    for (int split = 0; split < splits; ++split) {
        sum_dy += partial[(static_cast<i64>(split) * C + c) * 2];
        sum_dy_c += partial[(static_cast<i64>(split) * C + c) * 2 + 1];
    }
    sums[c] = static_cast<A>(sum_dy);
    sums[C + c] = static_cast<A>(sum_dy_c * rsqrt(norm[C + c] + eps));
}

// The gradient map of one channel: dx = scale * dy - k1 * centred(x) - k0.
template <class D> struct Gradient {
    typedef typename Type<D>::acc A;
    Centre<A> centre;
    A scale, k1, k0;
    __device__ __forceinline__ Gradient(const double* norm, const A* weight, const A* sums, int C, int c, double eps)
        : centre(norm, C, c, eps) {
        const double count = norm[2 * C] > 1.0 ? norm[2 * C] : 1.0;
        const double w = weight != nullptr ? static_cast<double>(weight[c]) : 1.0;
        const double s = w * centre.invstd;
        scale = static_cast<A>(s);
        k1 = static_cast<A>(s * centre.invstd * (static_cast<double>(sums[C + c]) / count));
        k0 = static_cast<A>(s * (static_cast<double>(sums[c]) / count));
    }
    __device__ __forceinline__ typename Type<D>::storage operator()(typename Type<D>::storage x,
                                                                    typename Type<D>::storage g) const {
        return Type<D>::store(scale * Type<D>::load(g) - k1 * centre.centred(Type<D>::load(x)) - k0);
    }
};

template <class D>
__device__ void backward_elemt_nchw(const typename Type<D>::storage* __restrict__ x,
                                    const typename Type<D>::storage* __restrict__ dy, typename Type<D>::storage* __restrict__ dx,
                                    const double* __restrict__ norm, const typename Type<D>::acc* __restrict__ weight,
                                    const typename Type<D>::acc* __restrict__ sums, int N, int C, i64 S, double eps,
                                    int ts_bits, int vec, int chunks, i64 chunk) {
    const int c = blockIdx.x;
    const Tile tile(THREADS, ts_bits);
    const Gradient<D> gradient(norm, weight, sums, C, c, eps);
    if (vec) {
        for_each_load(tile, N, S / Type<D>::vec, chunks, chunk, [=](i64 n, i64 i) {
            const i64 offset = (n * C + c) * S;
            Pack<D> px, pg;
            px.raw = reinterpret_cast<const Bytes16*>(x + offset)[i];
            pg.raw = reinterpret_cast<const Bytes16*>(dy + offset)[i];
#pragma unroll
            for (int k = 0; k < Type<D>::vec; ++k) px.v[k] = gradient(px.v[k], pg.v[k]);
            reinterpret_cast<Bytes16*>(dx + offset)[i] = px.raw;
        });
    } else {
        for_each_load(tile, N, S, chunks, chunk, [=](i64 n, i64 i) {
            const i64 at = (n * C + c) * S + i;
            dx[at] = gradient(x[at], dy[at]);
        });
    }
}

template <class D>
__device__ void backward_elemt_nhwc(const typename Type<D>::storage* __restrict__ x,
                                    const typename Type<D>::storage* __restrict__ dy, typename Type<D>::storage* __restrict__ dx,
                                    const double* __restrict__ norm, const typename Type<D>::acc* __restrict__ weight,
                                    const typename Type<D>::acc* __restrict__ sums, i64 M, int C, double eps) {
    const int c = blockIdx.x * 32 + threadIdx.x;
    if (c >= C) return;
    const Gradient<D> gradient(norm, weight, sums, C, c, eps);
    for (i64 m = static_cast<i64>(blockIdx.y) * ROWS + threadIdx.y; m < M; m += static_cast<i64>(gridDim.y) * ROWS)
        dx[m * C + c] = gradient(x[m * C + c], dy[m * C + c]);
}

}  // namespace

#define SYNCBN_BACKWARD(NAME, D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) syncbn_backward_reduce_nchw_##NAME(                      \
        const Type<D>::storage* __restrict__ x, const Type<D>::storage* __restrict__ dy,                           \
        const double* __restrict__ norm, int N, int C, i64 S, double eps, int ts_bits, int vec, int chunks,        \
        i64 chunk, double* __restrict__ partial) {                                                                 \
        backward_reduce_nchw<D>(x, dy, norm, N, C, S, eps, ts_bits, vec, chunks, chunk, partial);                  \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * ROWS) syncbn_backward_reduce_nhwc_##NAME(                    \
        const Type<D>::storage* __restrict__ x, const Type<D>::storage* __restrict__ dy,                           \
        const double* __restrict__ norm, i64 M, int C, double eps, double* __restrict__ partial) {                 \
        backward_reduce_nhwc<D>(x, dy, norm, M, C, eps, partial);                                                  \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS) syncbn_backward_elemt_nchw_##NAME(                       \
        const Type<D>::storage* __restrict__ x, const Type<D>::storage* __restrict__ dy,                           \
        Type<D>::storage* __restrict__ dx, const double* __restrict__ norm, const Type<D>::acc* __restrict__ weight, \
        const Type<D>::acc* __restrict__ sums, int N, int C, i64 S, double eps, int ts_bits, int vec, int chunks,  \
        i64 chunk) {                                                                                               \
        backward_elemt_nchw<D>(x, dy, dx, norm, weight, sums, N, C, S, eps, ts_bits, vec, chunks, chunk);          \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * ROWS) syncbn_backward_elemt_nhwc_##NAME(                     \
        const Type<D>::storage* __restrict__ x, const Type<D>::storage* __restrict__ dy,                           \
        Type<D>::storage* __restrict__ dx, const double* __restrict__ norm, const Type<D>::acc* __restrict__ weight, \
        const Type<D>::acc* __restrict__ sums, i64 M, int C, double eps) {                                         \
        backward_elemt_nhwc<D>(x, dy, dx, norm, weight, sums, M, C, eps);                                          \
    }

#define SYNCBN_BACKWARD_MERGE(NAME, A)                                                                         \
    extern "C" __global__ void syncbn_backward_merge_##NAME(const double* __restrict__ partial, int splits, int C, \
                                                             const double* __restrict__ norm, double eps,           \
                                                             A* __restrict__ sums) {                                \
        backward_merge<A>(partial, splits, C, norm, eps, sums);                                                     \
    }

SYNCBN_BACKWARD(f32, F32)
SYNCBN_BACKWARD(f64, F64)
SYNCBN_BACKWARD(f16, F16)
SYNCBN_BACKWARD(bf16, BF16)
SYNCBN_BACKWARD_MERGE(f32, float)
SYNCBN_BACKWARD_MERGE(f64, double)
