// The fused_pool_cpp operator library: the schemas of fused_pool/_schema.py (a test checks they
// match), the Python module `fused_pool._C` that loads them, and nothing else. The kernels
// register themselves per device: csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fused_pool._C` runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(fused_pool_cpp, m) {
  m.def("masked_mean(Tensor x, Tensor? mask, Tensor? cu_seqlens) -> Tensor");
  m.def(
      "masked_mean_backward(Tensor grad, Tensor? mask, Tensor? cu_seqlens, SymInt num_tokens) -> "
      "Tensor");
  m.def(
      "masked_extremum(Tensor x, Tensor? mask, Tensor? cu_seqlens, bool largest) -> (Tensor, "
      "Tensor)");
  m.def("masked_kmax(Tensor x, Tensor? mask, Tensor? cu_seqlens, int k) -> (Tensor, Tensor)");
  m.def(
      "index_pool_backward(Tensor grad, Tensor indices, Tensor? cu_seqlens, SymInt num_tokens) -> "
      "Tensor");
  m.def("masked_mean_max(Tensor x, Tensor? mask, Tensor? cu_seqlens) -> (Tensor, Tensor)");
  m.def(
      "masked_mean_max_backward(Tensor grad, Tensor indices, Tensor? mask, Tensor? cu_seqlens, "
      "SymInt num_tokens) -> Tensor");
  m.def(
      "attention_pool(Tensor x, Tensor scores, Tensor? mask, Tensor? cu_seqlens) -> (Tensor, "
      "Tensor)");
  m.def(
      "attention_pool_backward(Tensor grad, Tensor x, Tensor scores, Tensor? mask, Tensor? "
      "cu_seqlens, Tensor out, Tensor lse) -> (Tensor, Tensor)");
  m.def("weighted_layer_pool(Tensor[] layers, Tensor weights) -> Tensor");
  m.def(
      "weighted_layer_pool_backward(Tensor grad, Tensor[] layers, Tensor weights) -> (Tensor[], "
      "Tensor)");
  m.def("weighted_layer_mean(Tensor[] layers, Tensor weights, Tensor? mask) -> Tensor");
  m.def(
      "weighted_layer_mean_backward(Tensor grad, Tensor[] layers, Tensor weights, Tensor? mask) -> "
      "(Tensor[], Tensor)");
  m.def(
      "layer_norm(Tensor x, int normalized_ndim, Tensor? weight, Tensor? bias, float eps) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad, Tensor x, int normalized_ndim, Tensor? weight, Tensor? "
      "bias, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, int normalized_ndim, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_backward(Tensor grad, Tensor x, int normalized_ndim, Tensor? weight, Tensor rstd) "
      "-> (Tensor, Tensor)");
  m.def(
      "add_layer_norm(Tensor x, Tensor residual, int normalized_ndim, Tensor? weight, Tensor? "
      "bias, float eps, bool return_residual) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm_backward(Tensor grad, Tensor? grad_sum, Tensor x, Tensor residual, int "
      "normalized_ndim, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor, "
      "Tensor, Tensor)");
  m.def(
      "add_rms_norm(Tensor x, Tensor residual, int normalized_ndim, Tensor? weight, float eps, "
      "bool return_residual) -> (Tensor, Tensor, Tensor)");
  m.def(
      "add_rms_norm_backward(Tensor grad, Tensor? grad_sum, Tensor x, Tensor residual, int "
      "normalized_ndim, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def(
      "instance_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, "
      "Tensor)");
  m.def(
      "instance_norm_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_instance_norm(Tensor x, Tensor? mask, Tensor? cu_seqlens, Tensor? weight, Tensor? "
      "bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_instance_norm_backward(Tensor grad, Tensor x, Tensor? mask, Tensor? cu_seqlens, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}
