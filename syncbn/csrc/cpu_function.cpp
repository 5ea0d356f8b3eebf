// SyncBatchNorm's training call on CPU tensors, compiled: the autograd function of
// syncbn/_functions.py and the per-channel work of syncbn/ops/cpu.py in one C++ autograd node.
//
// Why: on a small layer the passes over the data cost less than the Python and NumPy between
// them (about 120 small operations a call), and than aten's dispatch and allocations around its
// own batch-norm kernels. Here the whole call is two C++ entries (forward and backward), the passes
// over the data are loops of our own (vectorised, in memory order, split over torch's intra-op
// threads), the O(C) arithmetic plain loops, and Python is entered only for what Python owns:
//
//   forward:  per-channel sum(x) and sum(x^2) in float64 (read x once; 3 more passes when the
//             batch is centred, as in Python)
//             -> [world size > 1] sync.forward_reduced(payload, x): the all-reduce and the checks
//                after it, which raise on every rank together (syncbn/_functions.py)
//             -> global statistics, running statistics (written in place, the version counter bumped
//                as a torch operation would) -> y = x * alpha + beta (read x, write y)
//   backward: sum(dy) and sum(dy * x_hat) in float64 (read dy and x)
//             -> [world size > 1] sync.backward_reduced(sums): the all-reduce
//             -> a rank that creates a graph (double backward) makes every rank raise, through
//                sync.double_backward_error -> dx = dy * a - x * k1 - k0 (read dy and x, write dx)
//
// The loops cover contiguous tensors (planes of H*W values, or rows of C for (N, C)) and
// channels-last ones (rows of C); other strides take aten's batch_norm and batch-norm backward.
// The payloads are those of the Python implementation, element for element (their layouts are
// in syncbn/ops/base.py), so ranks on either implementation sum them together. Float32 and
// float64 inputs with weight and bias of the same dtype; everything else stays in Python.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// sum(x^2) <= 8 * M2 means mean^2 <= 7 * variance: sums of the raw values then lose at most a
// factor 8 of float32's precision to cancellation (syncbn/ops/cpu.py, _WELL_CONDITIONED).
constexpr double kWellConditioned = 8.0;

std::vector<int64_t> channel_shape(int64_t ndim, int64_t channels) {
  std::vector<int64_t> shape(static_cast<size_t>(ndim), 1);
  shape[1] = channels;
  return shape;
}

std::vector<int64_t> reduce_dims(int64_t ndim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < ndim; ++d) dims.push_back(d);
  return dims;
}

// Mean 0 and variance 1 for `channels` channels, made once per channel count and dtype; never written to.
// Never destroyed: tensors freed after torch at exit would crash the process.
std::pair<at::Tensor, at::Tensor> constant_statistics(int64_t channels, at::ScalarType dtype) {
  static std::mutex mutex;
  static auto* made = new std::map<std::pair<int64_t, at::ScalarType>, std::pair<at::Tensor, at::Tensor>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(channels, dtype);
  auto found = made->find(key);
  if (found == made->end()) {
    if (made->size() >= 64) made->clear();  // a bound, as the Python implementation's cache has
    auto options = at::TensorOptions().dtype(dtype);
    found = made->emplace(key, std::make_pair(at::zeros({channels}, options), at::ones({channels}, options))).first;
  }
  return found->second;
}

// sum(t) and sum(t^2) per channel in t's dtype, from one pass: the inference-mode gradient of
// batch norm with g = t, mean 0 and variance 1 (syncbn/ops/cpu.py, _sums).
std::pair<at::Tensor, at::Tensor> sums(const at::Tensor& t) {
  const auto [zeros, ones] = constant_statistics(t.size(1), t.scalar_type());
  auto out = at::native_batch_norm_backward(t, t, {}, zeros, ones, {}, {}, false, 0.0, {false, true, true});
  return {std::get<2>(out).contiguous(), std::get<1>(out).contiguous()};
}


// Where a channel's values lie in memory: value (o, c, i) of a tensor seen as (outer, C, inner) is at
// (o * C + c) * inner + i. Contiguous (N, C, ...) is (N, C, prod(spatial)); (N, C) and channels-last
// are (rows, C, 1). Only tensors whose memory is one of these have a geometry.
struct Geometry {
  int64_t outer = 0, channels = 0, inner = 0;
};

std::optional<Geometry> geometry_of(const at::Tensor& t) {
  const int64_t channels = t.size(1);
  // A negated view's memory does not hold its values: aten resolves it.
  if (channels == 0 || t.numel() == 0 || t.is_neg()) return std::nullopt;
  if (t.is_contiguous()) return Geometry{t.size(0), channels, t.numel() / (t.size(0) * channels)};
  const auto format = t.dim() == 4 ? at::MemoryFormat::ChannelsLast
                      : t.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                     : at::MemoryFormat::Contiguous;
  if (format != at::MemoryFormat::Contiguous && t.is_contiguous(format)) return Geometry{t.numel() / channels, channels, 1};
  return std::nullopt;
}

// The geometry a and b share (same dtype and sizes, the same memory layout), if any. Two geometries of
// tensors of one size are equal exactly when their memory is laid out alike: a contiguous tensor that is
// also channels-last has one spatial position, and then both read it as (N, C, 1).
std::optional<Geometry> shared_geometry(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return std::nullopt;
  auto ga = geometry_of(a), gb = geometry_of(b);
  if (!ga || !gb || ga->outer != gb->outer || ga->inner != gb->inner) return std::nullopt;
  return ga;
}

// The loops over the data: each compiled for AVX2 and for the baseline, the one this CPU runs chosen when
// the library loads (aten's own kernels dispatch the same way). No contraction into FMA (-ffp-contract=off
// in syncbn/_extension.py), so both give the same results.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SYNCBN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SYNCBN_CLONES
#endif

// Four float64 lanes (GCC/Clang vector extensions: two SSE2 registers, or one AVX2 register in the AVX2
// clones), loaded from four values of T.
typedef double Double4 __attribute__((vector_size(4 * sizeof(double))));
typedef float Float4 __attribute__((vector_size(4 * sizeof(float))));

// Written through a reference: a 32-byte vector returned by value would change the baseline ABI.
inline __attribute__((always_inline)) void load4(const float* p, Double4& out) {
  Float4 v;
  std::memcpy(&v, p, sizeof v);
  out = __builtin_convertvector(v, Double4);
}

inline __attribute__((always_inline)) void load4(const double* p, Double4& out) { std::memcpy(&out, p, sizeof out); }

inline __attribute__((always_inline)) double add_lanes(const Double4& v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// s1 = sum a, s2 = sum a * (b - m) over channels [begin, end) of planes (inner > 1), in memory order: a
// channel's values lie in runs of `inner`, one per batch element; each run is summed in 4 x 4 float64
// lanes (independent chains), its last values (fewer than 16) four and then one at a time, and added to
// the channel's sums in batch order. Summed channel by channel across the batch instead (as aten does),
// the same loops were 1.3 to 1.5 times slower: memory order keeps the prefetcher streaming.
template <typename T, bool kCentre>
SYNCBN_CLONES void sum_planes(const T* __restrict__ a, const T* __restrict__ b, const double* __restrict__ m,
                              const Geometry g, int64_t begin, int64_t end, double* __restrict__ s1,
                              double* __restrict__ s2) {
  const int64_t body = g.inner - g.inner % 16;
  const int64_t quads = g.inner - g.inner % 4;
  std::fill(s1 + begin, s1 + end, 0.0);
  std::fill(s2 + begin, s2 + end, 0.0);
  for (int64_t o = 0; o < g.outer; ++o) {
    for (int64_t c = begin; c < end; ++c) {
      const double mc = kCentre ? m[c] : 0.0;
      const Double4 mv = {mc, mc, mc, mc};
      const T* ap = a + (o * g.channels + c) * g.inner;
      const T* bp = b + (o * g.channels + c) * g.inner;
      Double4 u1[4] = {}, u2[4] = {};
      int64_t i = 0;
      for (; i < body; i += 16) {
        for (int j = 0; j < 4; ++j) {
          Double4 av, bv;
          load4(ap + i + 4 * j, av);
          load4(bp + i + 4 * j, bv);
          u1[j] += av;
          u2[j] += av * (bv - mv);
        }
      }
      for (; i < quads; i += 4) {
        Double4 av, bv;
        load4(ap + i, av);
        load4(bp + i, bv);
        u1[0] += av;
        u2[0] += av * (bv - mv);
      }
      double t1 = 0.0, t2 = 0.0;
      for (; i < g.inner; ++i) {
        const double av = static_cast<double>(ap[i]);
        t1 += av;
        t2 += av * (static_cast<double>(bp[i]) - mc);
      }
      s1[c] += add_lanes((u1[0] + u1[1]) + (u1[2] + u1[3])) + t1;
      s2[c] += add_lanes((u2[0] + u2[1]) + (u2[2] + u2[3])) + t2;
    }
  }
}

// The same over rows [begin, end) of C values (inner == 1), added into s1[0, C) and s2[0, C).
template <typename T, bool kCentre>
SYNCBN_CLONES void sum_rows(const T* __restrict__ a, const T* __restrict__ b, const double* __restrict__ m,
                            int64_t channels, int64_t begin, int64_t end, double* __restrict__ s1,
                            double* __restrict__ s2) {
  for (int64_t r = begin; r < end; ++r) {
    const T* arow = a + r * channels;
    const T* brow = b + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const double av = static_cast<double>(arow[c]);
      const double bv = kCentre ? static_cast<double>(brow[c]) - m[c] : static_cast<double>(brow[c]);
      s1[c] += av;
      s2[c] += av * bv;
    }
  }
}

// Per channel, in float64: s1[c] = sum a, s2[c] = sum a * (b - m[c]), m = 0 unless kCentre (reads a and b
// once). Planes are split over channels, each summed whole (the result does not depend on the thread
// count); rows over row ranges, their partial sums then added in order.
template <typename T, bool kCentre>
void channel_sums(const T* a, const T* b, const double* m, const Geometry& g, double* s1, double* s2) {
  const int64_t channels = g.channels;
  const int64_t numel = g.outer * channels * g.inner;
  if (g.inner > 1) {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (g.outer * g.inner));
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      sum_planes<T, kCentre>(a, b, m, g, begin, end, s1, s2);
    });
    return;
  }
  std::fill(s1, s1 + channels, 0.0);
  std::fill(s2, s2 + channels, 0.0);
  const int64_t chunks = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), g.outer,
                                            std::max<int64_t>(1, numel / at::internal::GRAIN_SIZE)});
  if (chunks <= 1) {
    sum_rows<T, kCentre>(a, b, m, channels, 0, g.outer, s1, s2);
    return;
  }
  std::vector<double> partial(static_cast<size_t>(chunks * 2 * channels), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double* p = partial.data() + k * 2 * channels;
      sum_rows<T, kCentre>(a, b, m, channels, g.outer * k / chunks, g.outer * (k + 1) / chunks, p, p + channels);
    }
  });
  for (int64_t k = 0; k < chunks; ++k) {
    const double* p = partial.data() + k * 2 * channels;
    for (int64_t c = 0; c < channels; ++c) {
      s1[c] += p[c];
      s2[c] += p[channels + c];
    }
  }
}

// out = f * a[c] - x * k1[c] - k0[c] (a taken as 1 unless kScale; with k1 = 0 and k0 = -beta it is the
// forward's x * alpha + beta) over units [begin, end): planes of `inner` values, or rows of C (inner == 1).
// o may be f (the correction in place).
template <typename T, bool kScale, bool kWithX>
SYNCBN_CLONES void affine_units(T* o, const T* f, const T* __restrict__ x,
                                const T* __restrict__ a, const T* __restrict__ k1, const T* __restrict__ k0,
                                int64_t channels, int64_t inner, int64_t begin, int64_t end) {
  if (inner == 1) {
    for (int64_t r = begin; r < end; ++r) {
      T* orow = o + r * channels;
      const T* frow = f + r * channels;
      const T* xrow = x + r * channels;
      for (int64_t c = 0; c < channels; ++c) {
        T value = kScale ? frow[c] * a[c] : frow[c];
        if constexpr (kWithX) value -= xrow[c] * k1[c];
        orow[c] = value - k0[c];
      }
    }
    return;
  }
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % channels;
    const T ac = kScale ? a[c] : T(1), b1 = kWithX ? k1[c] : T(0), b0 = k0[c];
    T* op = o + p * inner;
    const T* fp = f + p * inner;
    const T* xp = x + p * inner;
    for (int64_t i = 0; i < inner; ++i) {
      T value = kScale ? fp[i] * ac : fp[i];
      if constexpr (kWithX) value -= xp[i] * b1;
      op[i] = value - b0;
    }
  }
}

template <typename T, bool kScale, bool kWithX>
void affine(T* o, const T* f, const T* x, const T* a, const T* k1, const T* k0, const Geometry& g) {
  const int64_t units = g.inner > 1 ? g.outer * g.channels : g.outer;
  const int64_t per_unit = g.inner > 1 ? g.inner : g.channels;
  at::parallel_for(0, units, std::max<int64_t>(1, at::internal::GRAIN_SIZE / per_unit), [&](int64_t begin, int64_t end) {
    affine_units<T, kScale, kWithX>(o, f, x, a, k1, k0, g.channels, g.inner, begin, end);
  });
}

template <typename T>
void to_double(const at::Tensor& t, double* out, int64_t n) {
  const T* data = t.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(data[i]);
}

void read_double(const at::Tensor& t, double* out, int64_t n) {
  if (t.scalar_type() == at::kDouble) {
    to_double<double>(t, out, n);
  } else {
    to_double<float>(t, out, n);
  }
}

// sum(t) and sum(t^2) per channel in float64 into total and total_sq: our loop where t's memory has a
// geometry, else aten's pass in t's dtype.
void channel_moments(const at::Tensor& t, double* total, double* total_sq) {
  if (auto g = geometry_of(t)) {
    if (t.scalar_type() == at::kDouble) {
      const double* data = t.data_ptr<double>();
      channel_sums<double, false>(data, data, nullptr, *g, total, total_sq);
    } else {
      const float* data = t.data_ptr<float>();
      channel_sums<float, false>(data, data, nullptr, *g, total, total_sq);
    }
    return;
  }
  auto [s, q] = sums(t);
  read_double(s, total, t.size(1));
  read_double(q, total_sq, t.size(1));
}

// The moments into the payload; returns (centered, shift as float64 or an undefined tensor for 0).
std::pair<at::Tensor, std::vector<double>> forward_moments(const at::Tensor& x, double* payload) {
  const int64_t channels = x.size(1);
  const int64_t count = x.numel() / channels;
  double* total = payload + 2;
  double* total_sq = payload + 2 + channels;
  std::vector<double> shift;
  if (count == 0) {  // an empty rank contributes zeros but still joins the all-reduce
    std::fill(total, total + 2 * channels, 0.0);
    return {x, shift};
  }
  channel_moments(x, total, total_sq);
  bool well_conditioned = true;
  const double bound = static_cast<double>(count) * (1.0 - 1.0 / kWellConditioned);
  for (int64_t c = 0; c < channels; ++c) {
    // In float64: not (a <= b) also catches NaN, which then takes the centred path as in Python.
    if (!(total[c] * total[c] <= total_sq[c] * bound)) {
      well_conditioned = false;
      break;
    }
  }
  if (well_conditioned) return {x, shift};
  // The shift must be close to the mean (its residual is summed n times in float32): torch's
  // cascade summation gives it, the sums above do not.
  auto shift_t = at::mean(x, reduce_dims(x.dim()), false, x.scalar_type());
  auto centered = x - shift_t.view(channel_shape(x.dim(), channels));
  shift.resize(static_cast<size_t>(channels));
  read_double(shift_t, shift.data(), channels);
  std::vector<double> sc(static_cast<size_t>(channels)), ss(static_cast<size_t>(channels));
  channel_moments(centered, sc.data(), ss.data());
  const double n = static_cast<double>(count);
  for (int64_t c = 0; c < channels; ++c) {
    total[c] = shift[c] * n + sc[c];
    total_sq[c] = (sc[c] + total[c]) * shift[c] + ss[c];
  }
  return {centered, shift};
}

template <typename T>
void fill_norm(T* norm, const double* payload, const std::vector<double>& shift, int64_t channels, double* mean,
               double* m2) {
  const double count = payload[2 * channels + 2];
  // An all-empty group has count 0: divide by 1, so that every statistic is a finite 0.
  const double safe_count = count > 0.0 ? count : 1.0;
  const double* total = payload + 2;
  const double* total_sq = payload + 2 + channels;
  for (int64_t c = 0; c < channels; ++c) {
    mean[c] = total[c] / safe_count;
    double m = total_sq[c] - total[c] * mean[c];
    m2[c] = m < 0.0 ? 0.0 : m;  // NaN stays NaN, as np.maximum keeps it
    norm[c] = static_cast<T>(mean[c] - (shift.empty() ? 0.0 : static_cast<double>(static_cast<T>(shift[c]))));
    norm[channels + c] = static_cast<T>(m2[c] / safe_count);
  }
  norm[2 * channels] = static_cast<T>(count);
}

// A buffer's values as float64 (a copy), and written back rounded once, with the version counter bumped as an
// in-place torch operation would (autograd then refuses a graph that saved the old values).
template <typename T>
void blend(at::Tensor& buffer, const std::vector<double>& batch, double keep, double factor, double scale) {
  T* data = buffer.data_ptr<T>();
  for (size_t c = 0; c < batch.size(); ++c) {
    data[c] = static_cast<T>(static_cast<double>(data[c]) * keep + factor * (batch[c] * scale));
  }
}

void blend_into(at::Tensor& buffer, const std::vector<double>& batch, double keep, double factor, double scale) {
  const bool direct = buffer.device().is_cpu() && buffer.is_contiguous() && !buffer.is_neg();
  if (direct && buffer.scalar_type() == at::kFloat) {
    blend<float>(buffer, batch, keep, factor, scale);
  } else if (direct && buffer.scalar_type() == at::kDouble) {
    blend<double>(buffer, batch, keep, factor, scale);
  } else {  // another dtype, layout or device: through a float64 copy
    auto values = buffer.to(at::kDouble, false, true).contiguous();
    blend<double>(values, batch, keep, factor, scale);
    buffer.copy_(values);
    return;  // copy_ bumped the version
  }
  torch::autograd::impl::bump_version(buffer);
}

void update_running_stats(const std::vector<double>& mean, const std::vector<double>& m2, double count,
                          at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& num_batches_tracked,
                          std::optional<double> momentum) {
  // The layer checks this before its call (the same words); here it keeps a direct call from a factor of 1/0.
  TORCH_CHECK(momentum.has_value() || num_batches_tracked.defined(),
              "momentum=None (cumulative average) needs num_batches_tracked");
  int64_t tracked = 0;
  if (num_batches_tracked.defined()) {
    if (num_batches_tracked.device().is_cpu() && num_batches_tracked.scalar_type() == at::kLong &&
        num_batches_tracked.numel() == 1) {
      tracked = ++*num_batches_tracked.data_ptr<int64_t>();  // add_(1) without a dispatch
      torch::autograd::impl::bump_version(num_batches_tracked);
    } else {
      num_batches_tracked.add_(1);
      tracked = momentum.has_value() ? 0 : num_batches_tracked.item<int64_t>();
    }
  }
  if (count == 0.0) return;
  const double factor = momentum.has_value() ? *momentum : 1.0 / static_cast<double>(tracked);
  const double keep = 1.0 - factor;
  // In float64, rounded once into the buffers; the running variance unbiased with the global count.
  blend_into(running_mean, mean, keep, factor, 1.0);
  blend_into(running_var, m2, keep, factor, 1.0 / std::max(count - 1.0, 1.0));
}

// y = (c - mean) * invstd * w + b per channel, with mean and variance from `norm` (as aten's batch_norm
// in evaluation mode reads them), as y = c * alpha + beta: alpha and beta made in float64, rounded once.
void normalize(const at::Tensor& centered, const at::Tensor& norm, const at::Tensor& weight, const at::Tensor& bias,
               double eps, const Geometry& g, at::Tensor& output) {
  const int64_t channels = g.channels;
  std::vector<double> values(static_cast<size_t>(2 * channels)), w, b;
  read_double(norm, values.data(), 2 * channels);
  if (weight.defined()) {
    w.resize(static_cast<size_t>(channels));
    read_double(weight.contiguous(), w.data(), channels);
  }
  if (bias.defined()) {
    b.resize(static_cast<size_t>(channels));
    read_double(bias.contiguous(), b.data(), channels);
  }
  auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<T> k(static_cast<size_t>(2 * channels));  // alpha (C), -beta (C)
    for (int64_t c = 0; c < channels; ++c) {
      const double invstd = 1.0 / std::sqrt(values[channels + c] + eps);
      const double alpha = w.empty() ? invstd : invstd * w[c];
      k[c] = static_cast<T>(alpha);
      k[channels + c] = static_cast<T>(values[c] * alpha - (b.empty() ? 0.0 : b[c]));
    }
    const T* x = centered.data_ptr<T>();
    affine<T, true, false>(output.data_ptr<T>(), x, x, k.data(), nullptr, k.data() + channels, g);
  };
  if (centered.scalar_type() == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
}

// sum(dy) and sum(dy * x_hat) per channel in the compute dtype, x_hat = (c - mean) * invstd with the mean
// and variance of `norm`: one pass over dy and c, accumulated in float64.
std::pair<at::Tensor, at::Tensor> gradient_sums(const at::Tensor& dy, const at::Tensor& centered, const at::Tensor& norm,
                                                double eps, const Geometry& g) {
  const int64_t channels = g.channels;
  std::vector<double> values(static_cast<size_t>(2 * channels));
  std::vector<double> s1(static_cast<size_t>(channels)), s2(static_cast<size_t>(channels));
  read_double(norm, values.data(), 2 * channels);
  auto sum_dy = at::empty({channels}, centered.options());
  auto sum_dy_xhat = at::empty({channels}, centered.options());
  auto run = [&](auto zero) {
    using T = decltype(zero);
    channel_sums<T, true>(dy.data_ptr<T>(), centered.data_ptr<T>(), values.data(), g, s1.data(), s2.data());
    T* out_dy = sum_dy.data_ptr<T>();
    T* out_dy_xhat = sum_dy_xhat.data_ptr<T>();
    for (int64_t c = 0; c < channels; ++c) {
      out_dy[c] = static_cast<T>(s1[c]);
      out_dy_xhat[c] = static_cast<T>(s2[c] / std::sqrt(values[channels + c] + eps));
    }
  };
  if (centered.scalar_type() == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return {sum_dy, sum_dy_xhat};
}

// The layer's SyncCall, kept in the autograd context for backward (saved_data holds IValues).
// Released under the GIL, whichever thread frees the graph.
struct SyncHolder final : c10::ivalue::PyObjectHolder {
  explicit SyncHolder(py::object object) : object_(std::move(object)) {}
  ~SyncHolder() override {
    py::gil_scoped_acquire gil;
    object_ = py::object();
  }
  PyObject* getPyObject() override { return object_.ptr(); }
  c10::InferredType tryToInferType() override { return c10::InferredType("syncbn: a SyncCall has no TorchScript type"); }
  c10::IValue toIValue(const c10::TypePtr&, std::optional<int32_t>) override {
    TORCH_CHECK(false, "syncbn: a SyncCall cannot become a TorchScript value");
  }
  std::string toStr() override { return "SyncCall"; }
  std::vector<at::Tensor> extractTensors() override { return {}; }

 private:
  py::object object_;
};

// Calls sync.<method>(args...) under the GIL; a Python exception propagates as it is.
template <typename... Args>
void call_python(const c10::IValue& sync, const char* method, Args&&... args) {
  py::gil_scoped_acquire gil;
  py::handle(sync.toPyObject()).attr(method)(std::forward<Args>(args)...);
}

struct SyncBatchNormCPU : public torch::autograd::Function<SyncBatchNormCPU> {
  // Optional tensors are std::optional (an undefined tensor is not a valid input of a node).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight_,
                            const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& running_mean_,
                            const std::optional<at::Tensor>& running_var_,
                            const std::optional<at::Tensor>& num_batches_tracked_, double momentum, bool has_momentum,
                            double eps, bool runs_backward, int64_t world_size, PyObject* sync_object) {
    const at::Tensor weight = weight_.value_or(at::Tensor());
    const at::Tensor bias = bias_.value_or(at::Tensor());
    at::Tensor running_mean = running_mean_.value_or(at::Tensor());
    at::Tensor running_var = running_var_.value_or(at::Tensor());
    at::Tensor num_batches_tracked = num_batches_tracked_.value_or(at::Tensor());
    c10::IValue sync;
    {
      py::gil_scoped_acquire gil;
      sync = c10::IValue(c10::intrusive_ptr<c10::ivalue::PyObjectHolder>(
          c10::make_intrusive<SyncHolder>(py::reinterpret_borrow<py::object>(sync_object))));
    }
    const int64_t channels = input.size(1);
    const int64_t count = input.numel() / channels;
    auto payload = at::empty({2 * channels + 4}, input.options().dtype(at::kDouble));
    double* p = payload.data_ptr<double>();
    p[0] = static_cast<double>(channels);
    p[1] = static_cast<double>(channels) * static_cast<double>(channels);
    p[2 * channels + 2] = static_cast<double>(count);
    p[2 * channels + 3] = runs_backward ? 1.0 : 0.0;
    auto [centered, shift] = forward_moments(input, p);
    // Every rank joins, even one with an empty batch; a group of one has nothing to add, and its
    // only check (more than one value per channel) is made here without Python.
    if (world_size > 1 || count == 1) call_python(sync, "forward_reduced", payload, input);

    auto norm = at::empty({2 * channels + 1}, centered.options());
    std::vector<double> mean(static_cast<size_t>(channels)), m2(static_cast<size_t>(channels));
    if (norm.scalar_type() == at::kDouble) {
      fill_norm(norm.data_ptr<double>(), p, shift, channels, mean.data(), m2.data());
    } else {
      fill_norm(norm.data_ptr<float>(), p, shift, channels, mean.data(), m2.data());
    }
    if (running_mean.defined() && running_var.defined()) {
      update_running_stats(mean, m2, p[2 * channels + 2], running_mean, running_var, num_batches_tracked,
                           has_momentum ? std::optional<double>(momentum) : std::nullopt);
    }
    at::Tensor output = at::empty_like(centered);
    if (centered.numel() > 0) {
      if (auto g = shared_geometry(output, centered)) {
        normalize(centered, norm, weight, bias, eps, *g, output);
      } else {
        output = at::batch_norm(centered, weight, bias, norm.narrow(0, 0, channels),
                                norm.narrow(0, channels, channels), false, 0.0, eps, false);
      }
    }
    ctx->save_for_backward({centered, weight, norm});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["world_size"] = world_size;
    ctx->saved_data["sync"] = std::move(sync);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Autograd runs this in grad mode exactly when the caller asked for create_graph=True.
    const bool creates_graph = at::GradMode::is_enabled();
    at::NoGradGuard no_grad;
    auto saved = ctx->get_saved_variables();
    const at::Tensor& centered = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& norm = saved[2];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t world_size = ctx->saved_data["world_size"].toInt();
    const c10::IValue& sync = ctx->saved_data["sync"];
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->needs_input_grad(2);
    const int64_t channels = centered.size(1);
    at::Tensor grad_output = grads[0];
    if (grad_output.scalar_type() != centered.scalar_type()) grad_output = grad_output.to(centered.scalar_type());

    // [sum dy (C), sum dy * x_hat (C), creates graph], in the compute dtype
    // The input gradient in one pass over dy and c after the all-reduce, where their layouts allow it;
    // else aten's dy * w * invstd now and a correction of it then (one more pass).
    const auto geometry = centered.numel() > 0 ? shared_geometry(grad_output, centered) : std::nullopt;
    const bool fused = need_input && geometry.has_value();
    at::Tensor scaled, sum_dy, sum_dy_xhat;
    if (centered.numel() == 0) {
      sum_dy = at::zeros({channels}, centered.options());
      sum_dy_xhat = at::zeros({channels}, centered.options());
    } else if (geometry) {
      std::tie(sum_dy, sum_dy_xhat) = gradient_sums(grad_output, centered, norm, eps, *geometry);
    } else {
      auto out = at::native_batch_norm_backward(grad_output, centered, weight, norm.narrow(0, 0, channels),
                                                norm.narrow(0, channels, channels), {}, {}, false, eps,
                                                {need_input, true, true});
      scaled = std::get<0>(out);
      sum_dy_xhat = std::get<1>(out);
      sum_dy = std::get<2>(out);
    }
    // [sum dy (C), sum dy * x_hat (C), creates graph]: the backward payload, its values those of the
    // compute dtype; summed over the group in that dtype.
    std::vector<double> summed(static_cast<size_t>(2 * channels + 1));
    read_double(sum_dy.contiguous(), summed.data(), channels);
    read_double(sum_dy_xhat.contiguous(), summed.data() + channels, channels);
    summed[2 * channels] = creates_graph ? 1.0 : 0.0;
    if (world_size > 1) {
      auto global_sums = at::empty({2 * channels + 1}, centered.options());
      if (global_sums.scalar_type() == at::kDouble) {
        std::copy(summed.begin(), summed.end(), global_sums.data_ptr<double>());
      } else {
        std::copy(summed.begin(), summed.end(), global_sums.data_ptr<float>());
      }
      call_python(sync, "backward_reduced", global_sums);
      read_double(global_sums, summed.data(), 2 * channels + 1);
    }
    const double graph_ranks = summed[2 * channels];
    if (graph_ranks != 0.0) {
      call_python(sync, "double_backward_error", static_cast<int64_t>(graph_ranks), creates_graph);
    }

    at::Tensor grad_input;
    if (need_input) {
      if (centered.numel() == 0) {
        grad_input = at::empty_like(centered, at::MemoryFormat::Contiguous);
      } else {
        grad_input = input_gradient(fused ? grad_output : scaled, fused, centered, norm, weight, eps, summed);
      }
    }
    variable_list result(12);
    result[0] = grad_input;
    if (need_weight) result[1] = sum_dy_xhat;
    if (need_bias) result[2] = sum_dy;
    return result;
  }

  // dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with the global means, as
  // dx = dy * a - c * k1 - k0 per channel (syncbn/ops/cpu.py, backward_elemt). `from` is dy when
  // `fused` (a new tensor is written), else dy * a made by aten (corrected in place, a = 1).
  static at::Tensor input_gradient(const at::Tensor& from, bool fused, const at::Tensor& centered,
                                   const at::Tensor& norm, const at::Tensor& weight, double eps,
                                   const std::vector<double>& summed) {
    const int64_t channels = centered.size(1);
    std::vector<double> values(static_cast<size_t>(2 * channels + 1));
    std::vector<double> w;
    read_double(norm, values.data(), 2 * channels + 1);
    if (weight.defined()) {
      w.resize(static_cast<size_t>(channels));
      read_double(weight.contiguous(), w.data(), channels);
    }
    const double count = values[2 * channels];
    const double per_value = count > 0.0 ? 1.0 / count : 1.0;
    at::Tensor out = fused ? at::empty_like(centered) : from;
    auto run = [&](auto zero) {
      using T = decltype(zero);
      std::vector<T> k(static_cast<size_t>(3 * channels));  // a (C), k1 (C), k0 (C)
      for (int64_t c = 0; c < channels; ++c) {
        const double invstd = 1.0 / std::sqrt(values[channels + c] + eps);
        const double scale = w.empty() ? invstd : invstd * w[c];
        const double scale_per_value = scale * per_value;
        const T k1 = static_cast<T>(summed[channels + c] * invstd * scale_per_value);
        k[c] = static_cast<T>(scale);
        k[channels + c] = k1;
        k[2 * channels + c] = static_cast<T>(summed[c] * scale_per_value - static_cast<double>(k1) * values[c]);
      }
      combine<T>(out, from, fused, centered, k.data(), k.data() + channels, k.data() + 2 * channels);
    };
    if (centered.scalar_type() == at::kDouble) {
      run(0.0);
    } else {
      run(0.0f);
    }
    return out;
  }

  // out = from * a - x * k1 - k0 per channel (a taken as 1 unless `scale`): one loop over the memory
  // when out, from and x share a geometry, else two torch operations.
  template <typename T>
  static void combine(at::Tensor& out, const at::Tensor& from, bool scale, const at::Tensor& centered, const T* a,
                      const T* k1, const T* k0) {
    const auto g = shared_geometry(out, centered);
    if (!g || (scale && !shared_geometry(from, centered))) {
      TORCH_CHECK(!scale, "syncbn: internal error: the fused input gradient needs matching layouts");
      std::vector<int64_t> shape = channel_shape(centered.dim(), centered.size(1));
      auto k1_t = at::from_blob(const_cast<T*>(k1), shape, centered.options());
      auto k0_t = at::from_blob(const_cast<T*>(k0), shape, centered.options());
      out.addcmul_(centered, k1_t, -1.0).sub_(k0_t);
      return;
    }
    T* o = out.data_ptr<T>();
    const T* x = centered.data_ptr<T>();
    if (scale) {
      affine<T, true, true>(o, from.data_ptr<T>(), x, a, k1, k0, *g);
    } else {
      affine<T, false, true>(o, from.data_ptr<T>(), x, a, k1, k0, *g);
    }
  }
};

at::Tensor sync_batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var,
                           const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
                           double eps, bool runs_backward, int64_t world_size, py::object sync) {
  TORCH_CHECK(input.device().is_cpu() && input.dim() >= 2, "syncbn's CPU extension takes CPU tensors (N, C, ...)");
  TORCH_CHECK(input.size(1) > 0, "syncbn's CPU extension takes input with at least one channel");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "syncbn's CPU extension takes float32 or float64 input, got ", input.scalar_type());
  PyObject* sync_object = sync.ptr();  // kept alive by this frame; referenced again under the GIL
  py::gil_scoped_release no_gil;
  return SyncBatchNormCPU::apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                 momentum.value_or(0.0), momentum.has_value(), eps, runs_backward, world_size,
                                 sync_object);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "syncbn's compiled CPU path (see syncbn/_extension.py)";
  module.def("sync_batch_norm", &sync_batch_norm, py::arg("input"), py::arg("weight"), py::arg("bias"),
             py::arg("running_mean"), py::arg("running_var"), py::arg("num_batches_tracked"), py::arg("momentum"),
             py::arg("eps"), py::arg("runs_backward"), py::arg("world_size"), py::arg("sync"));
}
