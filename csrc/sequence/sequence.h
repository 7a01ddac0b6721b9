// Token log-probabilities of the labels (sequence_logprob, DESIGN.md 3.8): the parameters every
// backend reads and the per-row rules shared by the CPU and CUDA kernels.
//
// Per row, z the logits and y the label:
//   token_logprob = (z_y - max z) - log sum_j exp(z_j - max z)      (never z_y - logsumexp: with
//                   large logits that difference would lose the low bits)
//   grad_logits_j = [j == y] - exp(z_j - max z) / sum               (d token_logprob / d z_j)
// A row whose label is ignore_index gives 0 and a zero gradient row, and its logits are never
// read. A label outside [0, V) gives NaN for the row (the Python wrapper has already raised or
// asserted on it) and is never dereferenced.
#pragma once

#include <cstdint>

#include "../common/macros.h"

namespace kdops {

struct SequenceParams {
  const void* logits = nullptr;  // [rows, vocab] input dtype, row stride below, last dim contiguous
  int64_t logits_row_stride = 0;
  const void* labels = nullptr;  // [rows] int32 or int64, contiguous
  bool labels_are_int64 = true;
  int64_t ignore_index = -100;
  int64_t rows = 0;
  int64_t vocab = 0;

  void* token_logprob = nullptr;  // [rows] accumulate type
  void* grad_logits = nullptr;    // [rows, vocab] input dtype, contiguous, or nullptr
};

enum class LabelKind { kIgnored, kOutOfRange, kValid };

KD_HOST_DEVICE int64_t label_at(const SequenceParams& p, int64_t row) {
  return p.labels_are_int64 ? static_cast<const int64_t*>(p.labels)[row]
                            : static_cast<const int32_t*>(p.labels)[row];
}

// ignore_index wins over the range check: an ignore_index inside [0, V) still marks the row ignored.
KD_HOST_DEVICE LabelKind classify_label(int64_t label, int64_t ignore_index, int64_t vocab) {
  if (label == ignore_index) return LabelKind::kIgnored;
  return label >= 0 && label < vocab ? LabelKind::kValid : LabelKind::kOutOfRange;
}

}  // namespace kdops
