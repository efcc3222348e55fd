// Linear layers as one cuBLASLt GEMM with the bias, or the bias and ReLU, applied in
// the epilogue: one kernel and one pass over the output instead of a GEMM plus a
// bias/activation kernel. Other activations (tanh, softplus: no epilogue for them)
// take the GEMM + kernel path of the base class.
//
// Row-major to cuBLASLt's column-major: y (rows x out) = x (rows x in) . w^T is
// y^T (out x rows) = w^T^T . x^T, where the row-major w (out x in) reads as the
// column-major (in x out) matrix with ld = in, taken transposed (op A = T), and x
// reads as x^T (in x rows) with ld = in (op B = N). The bias is per row of y^T, which
// is how the epilogue broadcasts it. FP32 compute (CUBLAS_COMPUTE_32F: no TF32), like
// the cuBLAS GEMMs, and the algorithm cuBLASLt's heuristic ranks first, kept per shape.
#include <cstdint>
#include <map>
#include <tuple>

#include "elbo/backend/cuda/cuda_internal.hpp"

namespace elbo {

struct LinearPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool usable = false;  // the heuristic found an algorithm within the workspace
  ~LinearPlan() {
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
  }
};

struct LinearPlans {
  // rows, in, out, epilogue, and the alignments of w, x and y: cuBLASLt's heuristic
  // assumes 256-byte aligned matrices unless told otherwise, and the layers' weights
  // sit at arbitrary float offsets of the flat parameter buffer.
  using Key = std::tuple<int, int, int, int, int, int, int>;
  std::map<Key, std::unique_ptr<LinearPlan>> by_shape;
};

void destroy(LinearPlans* p) noexcept { delete p; }

namespace {

// The largest power of two (up to 256) that divides the address.
int alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int bytes = 1;
  while (bytes < 256 && (a & static_cast<uintptr_t>(2 * bytes - 1)) == 0) bytes *= 2;
  return bytes;
}

LinearPlan& linear_plan(CudaBackend::State& st, int rows, int in, int out, cublasLtEpilogue_t epilogue, int align_w,
                        int align_x, int align_y) {
  if (!st.linear_plans) st.linear_plans.reset(new LinearPlans());
  const LinearPlans::Key key{rows, in, out, static_cast<int>(epilogue), align_w, align_x, align_y};
  auto it = st.linear_plans->by_shape.find(key);
  if (it != st.linear_plans->by_shape.end()) return *it->second;
  auto p = std::make_unique<LinearPlan>();
  CHECK_CUBLAS(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  const cudaDataType_t bias_type = CUDA_R_32F;
  CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                              sizeof(bias_type)));
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_32F, in, out, in));     // w as (in x out), ld in
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_32F, in, rows, in));    // x^T (in x rows), ld in
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&p->c, CUDA_R_32F, out, rows, out));  // y^T (out x rows), ld out
  cublasLtMatmulPreference_t pref = nullptr;
  CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = st.blas_workspace_bytes;
  CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const uint32_t aw = static_cast<uint32_t>(align_w), ax = static_cast<uint32_t>(align_x),
                 ay = static_cast<uint32_t>(align_y);
  CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aw, sizeof(aw)));
  CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ax, sizeof(ax)));
  CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ay, sizeof(ay)));
  CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ay, sizeof(ay)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t rc = cublasLtMatmulAlgoGetHeuristic(st.lt, p->op, p->a, p->b, p->c, p->c, pref, 1, &result,
                                                           &found);
  cublasLtMatmulPreferenceDestroy(pref);
  // No algorithm for this shape and epilogue is not an error: the caller falls back.
  p->usable = rc == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (p->usable) p->algo = result.algo;
  return *st.linear_plans->by_shape.emplace(key, std::move(p)).first->second;
}

}  // namespace

void CudaBackend::linear_forward(Activation act, int rows, int in, int out, const float* x, const float* w,
                                 const float* bias, float* pre, float* y) {
  if (rows == 0) return;
  if (act != Activation::Identity && act != Activation::Relu) {
    Backend<float>::linear_forward(act, rows, in, out, x, w, bias, pre, y);
    return;
  }
  // The epilogue reads the bias vectorized: a bias at an offset not 16-byte aligned
  // (the flat buffer puts it anywhere) takes the unfused path.
  if (alignment(bias) < 16) {
    Backend<float>::linear_forward(act, rows, in, out, x, w, bias, pre, y);
    return;
  }
  const cublasLtEpilogue_t epilogue = act == Activation::Relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
  LinearPlan& p = linear_plan(*m_state, rows, in, out, epilogue, alignment(w), alignment(x), alignment(y));
  if (!p.usable) {
    Backend<float>::linear_forward(act, rows, in, out, x, w, bias, pre, y);
    return;
  }
  // The bias differs per layer; the descriptor is the shape's, so set it per call.
  CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  const float one = 1.0f, zero = 0.0f;
  CHECK_CUBLAS(cublasLtMatmul(m_state->lt, p.op, &one, w, p.a, x, p.b, &zero, y, p.c, y, p.c, &p.algo,
                              m_state->blas_workspace, m_state->blas_workspace_bytes, m_state->stream));
}

}  // namespace elbo
