// Backend selection and the build/machine report shown by `elbo info`.
#include "elbo/backend/backend.hpp"

#include <cstdlib>

#include "elbo/backend/cpu/cpu_backend.hpp"
#include "elbo/util/error.hpp"

#ifdef ELBO_HAVE_CUDA
#include "elbo/backend/cuda/cuda_backend.hpp"
#include "elbo/backend/cuda/cuda_device.hpp"
#endif

namespace elbo {

template <class T>
void* Backend<T>::allocate_host(size_t bytes) {
  void* p = std::malloc(bytes == 0 ? 1 : bytes);
  if (p == nullptr) throw internal_error("out of host memory allocating " + std::to_string(bytes) + " bytes");
  return p;
}

template <class T>
void Backend<T>::free_host(void* p) noexcept {
  std::free(p);
}

namespace {

class Replayed final : public CapturedWork {
 public:
  explicit Replayed(std::function<void()> work) : m_work(std::move(work)) {}
  void launch() override { m_work(); }

 private:
  std::function<void()> m_work;
};

}  // namespace

template <class T>
std::unique_ptr<CapturedWork> Backend<T>::capture(std::function<void()> work) {
  return std::make_unique<Replayed>(std::move(work));
}

template <class T>
void Backend<T>::linear_forward(Activation act, int rows, int in, int out, const T* x, const T* w, const T* bias,
                                T* pre, T* y) {
  gemm(false, true, rows, out, in, T(1), x, in, w, in, T(0), pre, out);
  bias_act_forward(act, rows, out, bias, pre, y);
}

template class Backend<float>;
template class Backend<double>;

template <class T>
std::unique_ptr<Backend<T>> make_backend(DeviceKind kind, int threads, int gpu) {
  if (kind == DeviceKind::Cpu) return std::make_unique<CpuBackend<T>>(threads);
#ifdef ELBO_HAVE_CUDA
  if constexpr (std::is_same_v<T, float>) {
    return std::make_unique<CudaBackend>(gpu);
  } else {
    throw usage_error("the CUDA backend computes in float32 only; double precision runs on the CPU backend");
  }
#else
  (void)gpu;
  throw usage_error("this build of elbo has no CUDA backend (configured with ELBO_CUDA=OFF or without nvcc)");
#endif
}

template std::unique_ptr<Backend<float>> make_backend<float>(DeviceKind, int, int);
template std::unique_ptr<Backend<double>> make_backend<double>(DeviceKind, int, int);

BackendReport probe_backends() {
  BackendReport r;
#ifdef ELBO_HAVE_CUDA
  r.cuda_compiled = true;
  r.cuda_devices = cuda::device_count(&r.cuda_detail);
#else
  r.cuda_detail = "this build has no CUDA support (configured with ELBO_CUDA=OFF or nvcc not found)";
#endif
  return r;
}

}  // namespace elbo
