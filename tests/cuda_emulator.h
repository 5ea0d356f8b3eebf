// A CUDA execution model on the CPU, for running syncbn's kernels where there is no GPU.
//
// tests/cuda_emulator.py compiles a kernel family's source (common.cuh pasted in, as NVRTC gets it) with
// g++ and this header in front (-include), and launches its extern "C" entry points grid by grid:
//
// * every CUDA thread of a block is a fibre (ucontext) on one OS thread; blocks run one after another, so
//   that `__shared__` can be a function-local static (one per kernel instantiation, rewritten so by
//   tests/cuda_emulator.py), filled with NaN bytes (0xFF) at the start of every block, and runs are
//   deterministic;
// * __syncthreads() waits for every thread of the block that has not returned (threads that have returned
//   count as arrived, as on the device); __shfl_xor_sync() exchanges values within the 32 lanes of a warp
//   (full mask only), and reading a lane that has returned or does not exist is an error;
// * a launch beyond the device's limits (no thread, more than 1024 threads a block, a grid's y or z over
//   65535) is an error, as on the device;
// * a block whose threads all wait on barriers that cannot complete is a deadlock: the launch returns an
//   error instead of hanging (a __syncthreads() in divergent code, say);
// * threadIdx, blockIdx, blockDim and gridDim read the current fibre's coordinates;
// * each fibre has a 64 KiB stack with a page below it that may not be touched: an overflow crashes;
// * each fibre runs until it waits, in ascending thread order in even blocks and descending in odd ones,
//   so a missing __syncthreads() shows whichever thread writes and whichever reads.
//
// What it does not model: concurrency between blocks (blocks never run at the same time, so a race
// between blocks goes unseen), memory spaces (device pointers are host pointers), the device's float
// rounding (no fused multiply-add unless the compiler emits one, denormals kept; float16 converted in
// software and bfloat16 stored through the kernels' own pre-sm_80 rounding, both to nearest even as the
// device's instructions, but not the sm_80+ cvt.rn.bf16.f32 instruction itself), timing, and launch
// bounds (tests/cuda_emulator.py checks those).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

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

// A fibre's stack, with a page below it that may not be touched: a kernel that overflows its stack
// crashes the process there (SIGSEGV) instead of writing over other memory. Mapped once, kept for
// the process's life (fibres are reused from launch to launch).
inline char* fibre_stack(size_t size) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* base = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    mprotect(base, page, PROT_NONE);
    return static_cast<char*>(base) + page;
}

struct Fibre {
    ucontext_t context;
    char* stack = nullptr;
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
    long block_serial = 0;  // counts blocks, so that each poisons its shared memory once
    int error = 0;
    void (*body)(void*) = nullptr;
    void* closure = nullptr;
};

inline Machine machine;

// A __shared__ array, on the first pass of a block's threads over its declaration: filled with 0xFF bytes
// (NaN in every floating dtype), as unwritten shared memory holds whatever was there before.
inline void shared_region(void* data, size_t bytes, long& serial) {
    if (serial != machine.block_serial) {
        serial = machine.block_serial;
        std::memset(data, 0xFF, bytes);
    }
}

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
    if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) return 4;
    if (static_cast<unsigned long long>(block.x) * block.y * block.z > 1024 || block.z > 64 || grid.y > 65535 ||
        grid.z > 65535 || grid.x > 2147483647u)
        return 4;
    machine.error = 0;
    const int threads = static_cast<int>(block.x * block.y * block.z);
    const int warps = (threads + 31) / 32;
    machine.grid = grid;
    machine.block = block;
    if (static_cast<int>(machine.fibres.size()) < threads) machine.fibres.resize(threads);
    machine.warp_barriers.assign(warps, Barrier{});
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                machine.block_index = dim3{bx, by, bz};
                ++machine.block_serial;
                machine.lanes.assign(threads, ~0ull);
                machine.block_barrier = Barrier{threads, 0, 0};
                for (int w = 0; w < warps; ++w) {
                    const int lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
                    machine.warp_barriers[w] = Barrier{lanes, 0, 0};
                }
                for (int t = 0; t < threads; ++t) {
                    Fibre& f = machine.fibres[t];
                    if (f.stack == nullptr && (f.stack = fibre_stack(kStack)) == nullptr) return 6;
                    f.linear = t;
                    f.thread = dim3{static_cast<unsigned>(t) % block.x, (static_cast<unsigned>(t) / block.x) % block.y,
                                    static_cast<unsigned>(t) / (block.x * block.y)};
                    f.done = false;
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = f.stack;
                    f.context.uc_stack.ss_size = kStack;
                    f.context.uc_link = nullptr;
                    makecontext(&f.context, fibre_main, 0);
                }
                const bool descending = ((bx + by + bz) & 1u) != 0;
                for (int remaining = threads; remaining > 0;) {
                    const long before = machine.progress;
                    remaining = 0;
                    for (int i = 0; i < threads; ++i) {
                        Fibre& f = machine.fibres[descending ? threads - 1 - i : i];
                        if (f.done) continue;
                        machine.current = &f;
                        swapcontext(&machine.scheduler, &f.context);
                        remaining += f.done ? 0 : 1;
                    }
                    if (machine.error) return machine.error;
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

// IEEE binary16 <-> binary32 in software (no compiler half type needed), bit for bit as the device's
// cvt.f32.f16 and cvt.rn.f16.f32: exact widening; narrowing rounded to nearest even, overflow to
// infinity, subnormals kept, NaN to the canonical 0x7fff.
inline float half_to_float(unsigned short h) {
    const unsigned exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    float f;
    if (exponent == 0)
        f = std::ldexp(static_cast<float>(mantissa), -24);
    else if (exponent == 31)
        f = mantissa ? NAN : INFINITY;
    else
        f = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
    return (h & 0x8000u) ? -f : f;
}

inline unsigned short float_to_half(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
    const unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fff;                  // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;          // 65520 and more round to infinity
    if (a < 0x38800000u) {                                // below 2^-14: a subnormal half (or 0)
        float magnitude;
        std::memcpy(&magnitude, &a, sizeof magnitude);
        return sign | static_cast<unsigned short>(std::nearbyint(magnitude * 16777216.0f));  // units of 2^-24
    }
    unsigned int r = a - 0x38000000u;                     // exponent bias 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);                       // round the 13 dropped bits to nearest even
    return sign | static_cast<unsigned short>(r >> 13);
}

template <class T> T shfl_xor(T v, int mask) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffle moves at most 8 bytes");
    Fibre* self = machine.current;
    const int warp = self->linear / 32, lane = self->linear % 32;
    std::memcpy(&machine.lanes[self->linear], &v, sizeof(T));
    arrive_and_wait(machine.warp_barriers[warp]);
    const int source = 32 * warp + (lane ^ mask);
    T result = v;
    if (source >= static_cast<int>(machine.lanes.size()) || machine.fibres[source].done)
        machine.error = 5;  // a full-mask shuffle reading a lane that does not exist or has returned
    else
        std::memcpy(&result, &machine.lanes[source], sizeof(T));
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
// `__shared__ T name[N];` is rewritten by tests/cuda_emulator.py into a static and a shared_region() call.
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
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
