// The `adaptive_kv` op library: schemas here, CPU implementations in the other files
// of this folder. `import vllm_adaptive_kv._C` loads the library, which registers the
// ops under torch.ops.adaptive_kv; the Python module itself is empty.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(adaptive_kv, m) {
  m.def(
      "scored_decode_attention(Tensor q, Tensor token, Tensor row, Tensor head, Tensor table, Tensor lens, "
      "Tensor q_pos, Tensor kv_pages, Tensor slot_pos, Tensor(a!) out, Tensor(b!) slot_score, float scale) -> ()");
  m.def(
      "score_rows(Tensor q, Tensor first, Tensor count, Tensor row, Tensor head, Tensor table, Tensor lens, "
      "Tensor q_pos, Tensor kv_pages, Tensor slot_pos, Tensor(a!) slot_score, float scale) -> ()");
  m.def(
      "write_kv(Tensor key, Tensor value, Tensor slot_mapping, Tensor positions, Tensor flags, "
      "Tensor(a!) kv_pages, Tensor(b!) slot_pos, Tensor(c!) slot_flags, Tensor(d!) slot_score, "
      "bool k_transposed) -> ()");
  m.def(
      "compact_slots(Tensor(a!) kv_pages, Tensor(b!) slot_pos, Tensor(c!) slot_flags, Tensor(d!) slot_score, "
      "Tensor src_slot, Tensor dst_slot, Tensor num_moves, bool k_transposed) -> ()");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "vllm-adaptive-kv CPU kernels", -1, nullptr};
  return PyModule_Create(&module);
}
