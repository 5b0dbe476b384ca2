"""Training objectives as small pure functions of logits and labels.

Conventions: logits [B, T, V] (or hidden states and the head that makes logits of them) come from input_ids [B, T]; labels [B, T] hold the token at each position that should be
predicted (the input token itself) or IGNORE. Position t's logits predict token t + 1, so every function shifts once.
Losses are returned as SUMS (with the count they sum over where it matters): the training loop divides by the count
of the whole global batch, which makes gradient accumulation and data-parallel sharding give the same update as one
big batch.

- sft: cross-entropy of the target tokens.
- dpo (Rafailov et al.): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with pi / ref the summed
  log-probabilities of the chosen (c) and rejected (r) responses under the policy and the frozen reference.
- unlearn (Jain et al.): per example, mean NLL of the preferred response minus weight * mean NLL of the rejected one:
  gradient descent on the first, weighted gradient ascent on the second. The ascent is unbounded; keep weight small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100
OBJECTIVES = ("sft", "dpo", "unlearn")


Head = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


# Rows of logits taken to float32 at a time by RowCrossEntropy: a few MiB, so a chunk stays in cache between reads.
CHUNK_ROWS = 32


class RowCrossEntropy(torch.autograd.Function):
    """Cross-entropy [N] of logits [N, V] (any float dtype) against targets [N], computed in float32 chunk by chunk.

    The same values as F.cross_entropy(logits.float(), targets, reduction="none") up to float32 rounding, and the
    gradient arrives in the logits' dtype, as autocast's copy would round it. What it saves in bfloat16: the float32
    copy of the whole [N, V] logits, its log-softmax kept for backward, and the zero-filled float32 gradient buffer
    of the same size. Every chunk is worked on in place in one reused float32 buffer: a fresh buffer per chunk
    would cost more in page faults than the arithmetic."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for rows, chunk in float_chunks(logits):
            peak = chunk.amax(dim=-1, keepdim=True)
            lse[rows] = chunk.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
        ctx.save_for_backward(logits, targets, lse)
        return lse - logits.gather(1, targets[:, None]).squeeze(1).float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for rows, chunk in float_chunks(logits):
            softmax = chunk.sub_(lse[rows, None]).exp_()
            softmax.scatter_add_(1, targets[rows, None], softmax.new_full((softmax.shape[0], 1), -1.0))
            out[rows] = softmax.mul_(grad[rows, None])  # d nll / d logits = softmax - one_hot(target)
        return out, None


def float_chunks(logits: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """(rows, a float32 copy of logits[rows]) for CHUNK_ROWS rows at a time, every copy in the same buffer."""
    buffer = torch.empty(min(CHUNK_ROWS, logits.shape[0]), logits.shape[1], dtype=torch.float32,
                         device=logits.device)
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, logits.shape[0]))
        chunk = buffer[:rows.stop - start]
        yield rows, chunk.copy_(logits[rows])


def token_nll(hidden: Tensor, labels: Tensor, head: Head = _identity) -> Tensor:
    """Negative log-likelihood [B, T-1] of each next token (0 where the label is IGNORE), in float32.

    hidden [B, T, D] goes through head (hidden -> logits, in any float dtype) at the labelled positions only: with
    the default identity head it already holds the logits [B, T, V]; with a model's output layer the vocabulary-wide
    matmul is spent on target tokens alone, not on the prompt and the padding."""
    targets = labels[:, 1:]
    labelled = targets != IGNORE
    nll = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return nll.masked_scatter(labelled, RowCrossEntropy.apply(head(hidden[:, :-1][labelled]), targets[labelled]))


def sequence_sums(values: Tensor, rows: Tensor | None = None) -> Tensor:
    """Per sequence [B], the sum of per-position values [B, T-1] as token_nll gives them; for sequences packed into
    one row (values [1, N-1]), rows [N] names the sequence of each token, and a position counts towards the sequence
    of the token it predicts."""
    if rows is None:
        return values.sum(-1)
    # The last token names the last sequence: every sequence lays down at least its own last token, since
    # training.shareable_tokens never shares a position that predicts a target.
    return values.new_zeros(int(rows[-1]) + 1).index_add(0, rows[1:], values[0])


def sft_loss_sum(hidden: Tensor, labels: Tensor, head: Head = _identity) -> Tensor:
    """Summed cross-entropy over every target token of the batch (a scalar)."""
    return token_nll(hidden, labels, head).sum()


def sequence_logps(hidden: Tensor, labels: Tensor, head: Head = _identity, rows: Tensor | None = None) -> Tensor:
    """Summed log-probability [B] of each sequence's target tokens (rows: see sequence_sums)."""
    return -sequence_sums(token_nll(hidden, labels, head), rows)


def mean_nll(hidden: Tensor, labels: Tensor, head: Head = _identity, rows: Tensor | None = None) -> Tensor:
    """Mean NLL [B] per sequence over its target tokens (0 for a sequence with none; rows: see sequence_sums)."""
    counts = sequence_sums((labels[:, 1:] != IGNORE).float(), rows)
    return sequence_sums(token_nll(hidden, labels, head), rows) / counts.clamp(min=1)


def dpo_losses(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
               beta: float) -> Tensor:
    """DPO loss [B] from summed response log-probabilities; log 2 per example when policy = reference."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def unlearn_losses(nll_chosen: Tensor, nll_rejected: Tensor, weight: float) -> Tensor:
    """Unlearning loss [B]: NLL of the preferred response minus weight * NLL of the rejected one."""
    return nll_chosen - weight * nll_rejected


def pair_statistic(objective: str, hidden: Tensor, labels: Tensor, head: Head = _identity,
                   rows: Tensor | None = None) -> Tensor:
    """What a pair objective needs of each sequence [B]: the summed log-probability (dpo) or the mean NLL (unlearn)
    (rows: see sequence_sums)."""
    if objective == "dpo":
        return sequence_logps(hidden, labels, head, rows)
    if objective == "unlearn":
        return mean_nll(hidden, labels, head, rows)
    raise ValueError(f"objective must be dpo or unlearn here, got {objective!r}")


def pair_loss_sum(objective: str, values: Tensor, reference: Tensor | None, beta: float,
                  unlearn_weight: float) -> Tensor:
    """Summed dpo / unlearn loss of B pairs from their pair_statistic values [2B], the chosen rows first, then the
    rejected rows.

    reference [B, 2]: the reference model's summed log-probabilities of (chosen, rejected); dpo only.
    """
    half = values.shape[0] // 2
    if objective == "dpo":
        return dpo_losses(values[:half], values[half:], reference[:, 0], reference[:, 1], beta).sum()
    if objective == "unlearn":
        return unlearn_losses(values[:half], values[half:], unlearn_weight).sum()
    raise ValueError(f"objective must be dpo or unlearn here, got {objective!r}")
