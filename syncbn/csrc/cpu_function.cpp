// SyncBatchNorm's training call on CPU tensors, compiled: the autograd function of
// syncbn/_functions.py and the per-channel work of syncbn/ops/cpu.py in one C++ autograd node.
//
// Why: on a small layer the passes over the data cost less than the Python and NumPy between
// them (about 120 small operations a call). Here the whole call is two C++ entries (forward and
// backward), the same aten passes as the Python implementation, and the O(C) arithmetic in plain
// loops; Python is entered only for what Python owns:
//
//   forward:  local sums (read x once; 3 more passes when the batch is centred, as in Python)
//             -> [world size > 1] sync.forward_reduced(payload, x): the all-reduce and the checks
//                after it, which raise on every rank together (syncbn/_functions.py)
//             -> global statistics, running statistics (in-place torch ops: autograd's version
//                counter sees them) -> normalise (read x, write y)
//   backward: sum(dy), sum(dy * x_hat) and dy * w * invstd (read dy and x, write one tensor)
//             -> [world size > 1] sync.backward_reduced(sums): the all-reduce
//             -> a rank that creates a graph (double backward) makes every rank raise, through
//                sync.double_backward_error -> input gradient in place (read 2, write 1)
//
// The payloads are those of the Python implementation, element for element (their layouts are
// in syncbn/ops/base.py), so ranks on either implementation sum them together. Float32 and
// float64 inputs with weight and bias of the same dtype; everything else stays in Python.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
  auto [s, q] = sums(x);
  read_double(s, total, channels);
  read_double(q, total_sq, channels);
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
  auto [sum_c, sum_sq] = sums(centered);
  shift.resize(static_cast<size_t>(channels));
  read_double(shift_t, shift.data(), channels);
  std::vector<double> sc(static_cast<size_t>(channels)), ss(static_cast<size_t>(channels));
  read_double(sum_c, sc.data(), channels);
  read_double(sum_sq, ss.data(), channels);
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
  if (buffer.is_contiguous() && buffer.scalar_type() == at::kFloat) {
    blend<float>(buffer, batch, keep, factor, scale);
  } else if (buffer.is_contiguous() && buffer.scalar_type() == at::kDouble) {
    blend<double>(buffer, batch, keep, factor, scale);
  } else {  // another dtype or layout: through a float64 copy
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
  if (num_batches_tracked.defined()) num_batches_tracked.add_(1);
  if (count == 0.0) return;
  const double factor =
      momentum.has_value() ? *momentum : 1.0 / static_cast<double>(num_batches_tracked.item<int64_t>());
  const double keep = 1.0 - factor;
  // In float64, rounded once into the buffers; the running variance unbiased with the global count.
  blend_into(running_mean, mean, keep, factor, 1.0);
  blend_into(running_var, m2, keep, factor, 1.0 / std::max(count - 1.0, 1.0));
}

// [sum dy, sum dy * x_hat, creates graph]: the backward payload, in the compute dtype T.
template <typename T>
void fill_sums(T* out, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, int64_t channels, bool creates_graph) {
  const auto dy = sum_dy.contiguous();
  const auto dy_xhat = sum_dy_xhat.contiguous();
  std::copy_n(dy.data_ptr<T>(), channels, out);
  std::copy_n(dy_xhat.data_ptr<T>(), channels, out + channels);
  out[2 * channels] = creates_graph ? T(1) : T(0);
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
    at::Tensor output;
    if (centered.numel() == 0) {
      output = at::empty_like(centered);
    } else {
      output = at::batch_norm(centered, weight, bias, norm.narrow(0, 0, channels), norm.narrow(0, channels, channels),
                              false, 0.0, eps, false);
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
    auto global_sums = at::empty({2 * channels + 1}, centered.options());
    // The input gradient in one pass over dy and c after the all-reduce, where their layouts allow it;
    // else aten's dy * w * invstd now and a correction of it then (one more pass).
    const bool fused = need_input && centered.numel() > 0 && layout_of(grad_output, centered) != Layout::kOther;
    at::Tensor scaled, sum_dy, sum_dy_xhat;
    if (centered.numel() == 0) {
      sum_dy = at::zeros({channels}, centered.options());
      sum_dy_xhat = at::zeros({channels}, centered.options());
    } else {
      auto out = at::native_batch_norm_backward(grad_output, centered, weight, norm.narrow(0, 0, channels),
                                                norm.narrow(0, channels, channels), {}, {}, false, eps,
                                                {need_input && !fused, true, true});
      scaled = std::get<0>(out);
      sum_dy_xhat = std::get<1>(out);
      sum_dy = std::get<2>(out);
    }
    const bool is_double = global_sums.scalar_type() == at::kDouble;
    if (is_double) {
      fill_sums(global_sums.data_ptr<double>(), sum_dy, sum_dy_xhat, channels, creates_graph);
    } else {
      fill_sums(global_sums.data_ptr<float>(), sum_dy, sum_dy_xhat, channels, creates_graph);
    }
    if (world_size > 1) call_python(sync, "backward_reduced", global_sums);
    const double graph_ranks = is_double ? global_sums.data_ptr<double>()[2 * channels]
                                         : static_cast<double>(global_sums.data_ptr<float>()[2 * channels]);
    if (graph_ranks != 0.0) {
      call_python(sync, "double_backward_error", static_cast<int64_t>(graph_ranks), creates_graph);
    }

    at::Tensor grad_input;
    if (need_input) {
      if (centered.numel() == 0) {
        grad_input = at::empty_like(centered, at::MemoryFormat::Contiguous);
      } else {
        grad_input = input_gradient(fused ? grad_output : scaled, fused, centered, norm, weight, eps, global_sums);
      }
    }
    variable_list result(12);
    result[0] = grad_input;
    if (need_weight) result[1] = sum_dy_xhat;
    if (need_bias) result[2] = sum_dy;
    return result;
  }

  enum class Layout { kPlanes, kRows, kOther };

  // How a channel's values lie in memory when a and b share it: in runs of the spatial size (contiguous
  // NCHW), or C apart ((N, C), channels-last); kOther for any other strides, or layouts that differ.
  static Layout layout_of(const at::Tensor& a, const at::Tensor& b) {
    if (a.scalar_type() != b.scalar_type()) return Layout::kOther;
    const int64_t channels = b.size(1);
    if (a.is_contiguous() && b.is_contiguous()) {
      return b.numel() == b.size(0) * channels ? Layout::kRows : Layout::kPlanes;
    }
    const auto format = b.dim() == 4 ? at::MemoryFormat::ChannelsLast
                        : b.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                       : at::MemoryFormat::Contiguous;
    if (format != at::MemoryFormat::Contiguous && a.is_contiguous(format) && b.is_contiguous(format)) {
      return Layout::kRows;
    }
    return Layout::kOther;
  }

  // dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with the global means, as
  // dx = dy * a - c * k1 - k0 per channel (syncbn/ops/cpu.py, backward_elemt). `from` is dy when
  // `fused` (a new tensor is written), else dy * a made by aten (corrected in place, a = 1).
  static at::Tensor input_gradient(const at::Tensor& from, bool fused, const at::Tensor& centered,
                                   const at::Tensor& norm, const at::Tensor& weight, double eps,
                                   const at::Tensor& global_sums) {
    const int64_t channels = centered.size(1);
    std::vector<double> values(static_cast<size_t>(2 * channels + 1));
    std::vector<double> summed(static_cast<size_t>(2 * channels));
    std::vector<double> w;
    read_double(norm, values.data(), 2 * channels + 1);
    read_double(global_sums, summed.data(), 2 * channels);
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
  // when the layouts allow it, else two torch operations.
  template <typename T>
  static void combine(at::Tensor& out, const at::Tensor& from, bool scale, const at::Tensor& centered, const T* a,
                    const T* k1, const T* k0) {
    const int64_t channels = centered.size(1);
    const int64_t numel = centered.numel();
    const Layout layout = scale ? layout_of(from, centered) : layout_of(out, centered);
    if (layout == Layout::kOther || (scale && layout_of(out, centered) != layout)) {
      TORCH_CHECK(!scale, "syncbn: internal error: the fused input gradient needs matching layouts");
      std::vector<int64_t> shape = channel_shape(centered.dim(), channels);
      auto k1_t = at::from_blob(const_cast<T*>(k1), shape, centered.options());
      auto k0_t = at::from_blob(const_cast<T*>(k0), shape, centered.options());
      out.addcmul_(centered, k1_t, -1.0).sub_(k0_t);
      return;
    }
    T* o = out.data_ptr<T>();
    const T* f = from.data_ptr<T>();
    const T* x = centered.data_ptr<T>();
    if (layout == Layout::kRows) {  // (rows, C): a channel's values C apart
      const int64_t rows = numel / channels;
      at::parallel_for(0, rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / channels), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          T* orow = o + r * channels;
          const T* frow = f + r * channels;
          const T* xrow = x + r * channels;
          if (scale) {
            for (int64_t c = 0; c < channels; ++c) orow[c] = frow[c] * a[c] - xrow[c] * k1[c] - k0[c];
          } else {
            for (int64_t c = 0; c < channels; ++c) orow[c] = frow[c] - xrow[c] * k1[c] - k0[c];
          }
        }
      });
    } else {  // (N, C, inner): a channel's values in runs of `inner`
      const int64_t inner = numel / (centered.size(0) * channels);
      const int64_t planes = numel / inner;
      at::parallel_for(0, planes, std::max<int64_t>(1, at::internal::GRAIN_SIZE / inner), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t c = p % channels;
          const T ac = scale ? a[c] : T(1), b1 = k1[c], b0 = k0[c];
          T* op = o + p * inner;
          const T* fp = f + p * inner;
          const T* xp = x + p * inner;
          for (int64_t i = 0; i < inner; ++i) op[i] = fp[i] * ac - xp[i] * b1 - b0;
        }
      });
    }
  }
};

at::Tensor sync_batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var,
                           const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
                           double eps, bool runs_backward, int64_t world_size, py::object sync) {
  TORCH_CHECK(input.device().is_cpu() && input.dim() >= 2, "syncbn's CPU extension takes CPU tensors (N, C, ...)");
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
