// Every kdops operator schema, in one place. Backends register implementations in their own
// files (TORCH_LIBRARY_IMPL); fake kernels and autograd are registered from Python
// (python/kdops/_ops). The Python module below only exists so that `import kdops._C` loads this
// library; it uses the limited API and links no libtorch_python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(kdops, m) {
  // Fused divergence (DESIGN.md 3.1) on [rows, vocab] logits. Returns the reduced (or per-row)
  // loss and, for each flag set, the gradient already multiplied by the reduction's scale:
  // student and teacher [rows, vocab] in the input dtype, temperature per row [rows].
  // Unrequested gradients are empty [0] tensors.
  m.def(
      "kd_loss(Tensor student, Tensor teacher, Tensor temperature, Tensor? valid, "
      "Tensor? normalizer, str divergence, float beta, float alpha, str reduction, "
      "bool t2_scale, bool grad_student, bool grad_teacher, bool grad_temperature) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher, Tensor grad_temperature)",
      {at::Tag::pt2_compliant_tag});

  // Sparse-teacher divergence (DESIGN.md 3.2): student [rows, vocab] logits against a teacher
  // known on K ids per row (teacher_ids int32/int64 [rows, K], teacher_logprobs [rows, K] in the
  // accumulate dtype). Outputs as kd_loss; grad_teacher is [rows, K] in the accumulate dtype.
  m.def(
      "topk_kd_loss(Tensor student, Tensor teacher_ids, Tensor teacher_logprobs, "
      "Tensor temperature, Tensor? valid, Tensor? normalizer, str divergence, float beta, "
      "float alpha, bool renormalize, str reduction, bool t2_scale, bool grad_student, "
      "bool grad_teacher, bool grad_temperature) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher, Tensor grad_temperature)",
      {at::Tag::pt2_compliant_tag});

  // Fused linear + divergence (DESIGN.md 3.3): logits = student_hidden [rows, hidden] @
  // student_weight [vocab, hidden]^T (+ student_bias), formed chunk_size rows at a time (0: a
  // default), against one teacher form: teacher_logits [rows, vocab], teacher_hidden + weight
  // (+ bias), or teacher_ids + teacher_logprobs [rows, K]. softcap > 0 caps both formed logits
  // (0: off). Returns the loss and, for each flag set, the reduction-scaled gradient of
  // student_hidden [rows, hidden], student_weight [vocab, hidden], student_bias [vocab] (input
  // dtypes) and the temperature per row [rows]. Implemented in Python (kdops/fused_linear.py).
  m.def(
      "fused_linear_kd_loss(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor? teacher_logits, Tensor? teacher_hidden, Tensor? teacher_weight, "
      "Tensor? teacher_bias, Tensor? teacher_ids, Tensor? teacher_logprobs, Tensor temperature, "
      "Tensor? valid, Tensor? normalizer, str divergence, float beta, float alpha, "
      "bool renormalize, str reduction, bool t2_scale, float softcap, int chunk_size, "
      "bool grad_hidden, bool grad_weight, bool grad_bias, bool grad_temperature) "
      "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_temperature)",
      {at::Tag::pt2_compliant_tag});

  // Exact top-fraction selection (DESIGN.md 3.7): a bool mask over scores [N], true where the score
  // is >= torch.quantile(valid scores, 1 - fraction) (linear interpolation, ties kept); valid
  // [N] bool or None. No limit on N; no full sort.
  m.def("select_top_fraction(Tensor scores, float fraction, Tensor? valid) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // AdaSPEC's per-token statistics (DESIGN.md 3.7) in one read of the three [rows, vocab] logit
  // tensors: KL(p || q_draft) and KL(p || q_reference) per row, p = softmax(target / tau), in the
  // accumulate dtype; 0 for rows that are not valid.
  m.def(
      "adaspec_token_kl(Tensor draft, Tensor reference, Tensor target, Tensor temperature, "
      "Tensor? valid) -> (Tensor draft_kl, Tensor reference_kl)",
      {at::Tag::pt2_compliant_tag});

  // Token log-probabilities of the labels (DESIGN.md 3.8): log_softmax(logits [rows, vocab])[label]
  // per row without materializing log-probabilities (0 where label == ignore_index), and, when
  // grad is set, d logprob / d logits = onehot(label) - softmax [rows, vocab] in the input dtype
  // (zero rows where ignored; empty [0] otherwise).
  m.def(
      "sequence_logprob(Tensor logits, Tensor labels, int ignore_index, bool grad) "
      "-> (Tensor token_logprob, Tensor grad_logits)",
      {at::Tag::pt2_compliant_tag});

  // Top-k co-activation node features (DESIGN.md 3.4) of logits [batch, seq, vocab]: per valid
  // position the k largest logits (ties: lower id first), their values x = softmax(z / tau) or
  // z (transform "logits"), and features [batch, vocab] = sum over positions of x~ * sum(x~),
  // divided by the valid positions when normalizing; accumulate type. Also returns what backward
  // reuses: top_ids int64 [batch, seq, k], top_values [batch, seq, k] and shifted_lse [batch, seq]
  // = log sum exp((z - z[top_ids[0]]) / tau) (0 for transform "logits"); all 0 at positions
  // that are not valid.
  m.def(
      "coactivation_features(Tensor logits, int k, Tensor temperature, Tensor? valid, "
      "str transform, bool normalize) "
      "-> (Tensor features, Tensor top_ids, Tensor top_values, Tensor shifted_lse)",
      {at::Tag::pt2_compliant_tag});

  // The logit gradient [batch, seq, vocab] (input dtype) of coactivation_features for
  // grad_features [batch, vocab] (accumulate type), from forward's saved outputs.
  m.def(
      "coactivation_features_backward(Tensor grad_features, Tensor logits, Tensor top_ids, "
      "Tensor top_values, Tensor shifted_lse, Tensor temperature, Tensor? valid, str transform, "
      "bool normalize) -> Tensor",
      {at::Tag::pt2_compliant_tag});

  // Token relation distillation (DESIGN.md 3.6) over student [G, N, D_s] and teacher [G, N, D_t]
  // features (same dtype, last dim contiguous), without an N x N matrix: per valid row (valid
  // [G, N] bool or None) the kind's value r_i over the relations F F^T / temperature (a 0-d
  // accumulate-type tensor) of its group's valid tokens (less itself when exclude_diagonal), of
  // the L2-normalized tokens when normalize (fused: no normalized copy). row_loss [G, N]
  // accumulate type (0 at rows that do not count); row_stats [G, N, 4], what backward needs: kl
  // (lse_s, lse_t, r, 0), mse (lse_s, lse_t, sigma_s, sigma_t), infonce (lse_c, 0, 0, 0).
  m.def(
      "relation_kd_loss(Tensor student, Tensor teacher, Tensor temperature, Tensor? valid, "
      "str kind, bool exclude_diagonal, bool normalize) -> (Tensor row_loss, Tensor row_stats)",
      {at::Tag::pt2_compliant_tag});

  // The feature gradients of relation_kd_loss for grad_row_loss [G, N] (accumulate type, ignored
  // at rows that do not count), recomputing the relation tiles; in the input dtype, shaped like
  // the features; a gradient not asked for is an empty [0] tensor. row_dots [G, N, 2] (accumulate
  // type): per token <g, u> of the student's and the teacher's gradient g with respect to the
  // relation tokens u (0 where not asked for), from which the temperature's gradient follows
  // (csrc/relation/relation.h).
  m.def(
      "relation_kd_loss_backward(Tensor grad_row_loss, Tensor student, Tensor teacher, "
      "Tensor temperature, Tensor? valid, Tensor row_stats, str kind, bool exclude_diagonal, "
      "bool normalize, bool student_grad, bool teacher_grad) -> (Tensor grad_student, "
      "Tensor grad_teacher, Tensor row_dots)",
      {at::Tag::pt2_compliant_tag});
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "kdops operators: loading this module registers them with torch.ops.kdops",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
