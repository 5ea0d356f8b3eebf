// A CUDA execution model on the CPU, for running syncbn's kernels where there is no GPU.
//
// tests/cuda_emulator.py compiles a kernel family's source (common.cuh pasted in, as NVRTC gets it) with
// g++ and this header in front (-include), and launches its extern "C" entry points grid by grid:
//
// * every CUDA thread of a block is a fibre (ucontext) on one OS thread; blocks run one after another, so
//   that `__shared__` can be a function-local static (one per kernel instantiation) and runs are
//   deterministic;
// * __syncthreads() waits for every thread of the block that has not returned (threads that have returned
//   count as arrived, as on the device); __shfl_xor_sync() exchanges values within the 32 lanes of a warp;
// * a block whose threads all wait on barriers that cannot complete is a deadlock: the launch returns an
//   error instead of hanging (a __syncthreads() in divergent code, say);
// * threadIdx, blockIdx, blockDim and gridDim read the current fibre's coordinates;
// * each fibre runs until it waits, in thread order, so a missing __syncthreads() shows: thread 0
//   reads shared memory before the others have written it.
//
// What it does not model: concurrency between blocks (blocks never run at the same time, so a race
// between blocks goes unseen), memory spaces (device pointers are host pointers), the device's float
// rounding (no fused multiply-add unless the compiler emits one, denormals kept; float16 through the
// compiler's _Float16, bfloat16 stores through the kernels' own pre-sm_80 rounding, both to nearest
// even as the device's instructions), and timing.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace syncbn_emulator {

struct Barrier {
    int expected = 0, arrived = 0;
    long generation = 0;
};

struct Fibre {
    ucontext_t context;
    std::vector<char> stack;
    dim3 thread;
    int linear = 0;
    bool done = false;
};

struct Machine {
    dim3 grid, block, block_index;
    std::vector<Fibre> fibres;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<unsigned long long> lanes;  // one exchange slot per thread, for the warp shuffles
    Fibre* current = nullptr;
    ucontext_t scheduler;
    long progress = 0;  // anything that moved: an arrival at a barrier, a thread that returned
    void (*body)(void*) = nullptr;
    void* closure = nullptr;
};

inline Machine machine;

inline void yield() { swapcontext(&machine.current->context, &machine.scheduler); }

inline void release(Barrier& b) {
    b.arrived = 0;
    ++b.generation;
    ++machine.progress;
}

inline void arrive_and_wait(Barrier& b) {
    const long generation = b.generation;
    ++machine.progress;
    if (++b.arrived == b.expected) {
        release(b);
        return;
    }
    while (b.generation == generation) yield();
}

inline void drop(Barrier& b) {  // a thread that has returned no longer holds the others back
    --b.expected;
    if (b.arrived > 0 && b.arrived == b.expected) release(b);
}

inline void fibre_main() {
    Fibre* self = machine.current;
    machine.body(machine.closure);
    self->done = true;
    ++machine.progress;
    drop(machine.block_barrier);
    drop(machine.warp_barriers[self->linear / 32]);
    swapcontext(&self->context, &machine.scheduler);  // never resumed
}

// Runs every block of the grid; 0, or 3 when a block deadlocked.
inline int run_grid(dim3 grid, dim3 block) {
    constexpr size_t kStack = 64 * 1024;
    const int threads = static_cast<int>(block.x * block.y * block.z);
    const int warps = (threads + 31) / 32;
    machine.grid = grid;
    machine.block = block;
    if (static_cast<int>(machine.fibres.size()) < threads) machine.fibres.resize(threads);
    machine.warp_barriers.assign(warps, Barrier{});
    machine.lanes.assign(threads, 0);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                machine.block_index = dim3{bx, by, bz};
                machine.block_barrier = Barrier{threads, 0, 0};
                for (int w = 0; w < warps; ++w) {
                    const int lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
                    machine.warp_barriers[w] = Barrier{lanes, 0, 0};
                }
                for (int t = 0; t < threads; ++t) {
                    Fibre& f = machine.fibres[t];
                    if (f.stack.size() < kStack) f.stack.resize(kStack);
                    f.linear = t;
                    f.thread = dim3{static_cast<unsigned>(t) % block.x, (static_cast<unsigned>(t) / block.x) % block.y,
                                    static_cast<unsigned>(t) / (block.x * block.y)};
                    f.done = false;
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = f.stack.data();
                    f.context.uc_stack.ss_size = f.stack.size();
                    f.context.uc_link = nullptr;
                    makecontext(&f.context, fibre_main, 0);
                }
                for (int remaining = threads; remaining > 0;) {
                    const long before = machine.progress;
                    remaining = 0;
                    for (int t = 0; t < threads; ++t) {
                        Fibre& f = machine.fibres[t];
                        if (f.done) continue;
                        machine.current = &f;
                        swapcontext(&machine.scheduler, &f.context);
                        remaining += f.done ? 0 : 1;
                    }
                    if (remaining > 0 && machine.progress == before) return 3;
                }
            }
    machine.current = nullptr;
    return 0;
}

template <class T> constexpr char kind() {
    return std::is_pointer_v<T> ? 'p' : std::is_floating_point_v<T> ? 'f' : 'i';
}

// Launches fn with arguments read from argv (one pointer to each value) after checking them against
// the kernel's parameters: kinds[i] 'p' (a device pointer, 8 bytes), 'i' (an integer of sizes[i] bytes)
// or 'f' (a float of sizes[i] bytes). 1: wrong count, 2: a kind or size that does not match.
template <class... Args, size_t... I>
int launch_impl(void (*fn)(Args...), const unsigned* grid, const unsigned* block, void** argv, const char* kinds,
                const long* sizes, int count, std::index_sequence<I...>) {
    if (count != static_cast<int>(sizeof...(Args))) return 1;
    constexpr char expected_kinds[] = {kind<Args>()..., 0};
    constexpr long expected_sizes[] = {static_cast<long>(sizeof(Args))..., 0};
    for (int i = 0; i < count; ++i)
        if (kinds[i] != expected_kinds[i] || sizes[i] != expected_sizes[i]) return 2;
    std::tuple<std::remove_cv_t<Args>...> values;
    ((std::memcpy(&std::get<I>(values), argv[I], sizeof(Args))), ...);
    struct Call {
        void (*fn)(Args...);
        std::tuple<std::remove_cv_t<Args>...>* values;
    } call{fn, &values};
    machine.closure = &call;
    machine.body = [](void* closure) {
        Call* c = static_cast<Call*>(closure);
        std::apply(c->fn, *c->values);
    };
    return run_grid(dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]});
}

template <class... Args>
int launch(void (*fn)(Args...), const unsigned* grid, const unsigned* block, void** argv, const char* kinds,
           const long* sizes, int count) {
    return launch_impl(fn, grid, block, argv, kinds, sizes, count, std::index_sequence_for<Args...>{});
}

inline float half_to_float(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, sizeof v);
    return static_cast<float>(v);
}

inline unsigned short float_to_half(float f) {
    const _Float16 v = static_cast<_Float16>(f);  // round to nearest even, as cvt.rn.f16.f32
    unsigned short h;
    std::memcpy(&h, &v, sizeof h);
    return h;
}

template <class T> T shfl_xor(T v, int mask) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffle moves at most 8 bytes");
    Fibre* self = machine.current;
    const int warp = self->linear / 32, lane = self->linear % 32;
    std::memcpy(&machine.lanes[self->linear], &v, sizeof(T));
    arrive_and_wait(machine.warp_barriers[warp]);
    const int source = 32 * warp + (lane ^ mask);
    T result = v;  // a lane beyond the block reads its own value
    if (source < static_cast<int>(machine.lanes.size())) std::memcpy(&result, &machine.lanes[source], sizeof(T));
    arrive_and_wait(machine.warp_barriers[warp]);  // nobody overwrites a slot before every lane has read it
    return result;
}

}  // namespace syncbn_emulator

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define threadIdx (::syncbn_emulator::machine.current->thread)
#define blockIdx (::syncbn_emulator::machine.block_index)
#define blockDim (::syncbn_emulator::machine.block)
#define gridDim (::syncbn_emulator::machine.grid)

inline void __syncthreads() { ::syncbn_emulator::arrive_and_wait(::syncbn_emulator::machine.block_barrier); }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask) { return ::syncbn_emulator::shfl_xor(v, mask); }
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
