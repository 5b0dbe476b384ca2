"""Utility metrics: ROUGE-L F1 of generated answers against references, and teacher-forced perplexity.

ROUGE-L here: both texts lower-cased and split into runs of letters and digits (everything else separates
tokens), LCS = the longest common subsequence of the two token lists, precision = LCS / candidate tokens,
recall = LCS / reference tokens, F1 = their harmonic mean (0 when either text has no tokens). No stemming.

Perplexity: exp of the mean negative log-likelihood over every reference-response token and the EOS after it,
each predicted from the prompt (formatted with the template) and the response tokens before it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minisafe.fastpath import fast_inference
from minisafe.model import Packed, Transformer
from minisafe.tokenizer import Tokenizer

_WORD = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of ASCII letters and digits."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of one candidate against one reference (see the module docstring)."""
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over pairs."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"need one candidate per reference, at least one: got {len(candidates)} and {len(references)}")
    return sum(rouge_l(c, r) for c, r in zip(candidates, references)) / len(candidates)


def response_ids(tokenizer: Tokenizer, response: str) -> list[int]:
    """Token ids a model should produce for a response: its text, then the tokenizer's EOS."""
    return tokenizer.encode(response, add_special_tokens=False) + tokenizer.eos_token_ids[:1]


LOGITS_BUDGET = 1 << 28  # logits one scoring batch may hold: 1 GiB in float32


def length_batches(widths: Sequence[int], batch_size: int, max_tokens: int) -> list[range]:
    """Consecutive index ranges over sequences sorted by width: at most batch_size sequences and, padded to the
    widest, at most max_tokens tokens (but always at least one sequence)."""
    batches, start = [], 0
    while start < len(widths):
        end = start + 1
        while end < len(widths) and end - start < batch_size and (end + 1 - start) * widths[end] <= max_tokens:
            end += 1
        batches.append(range(start, end))
        start = end
    return batches


@torch.inference_mode()
def response_nlls(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str],
                  template: str = "chat", batch_size: int = 8, progress: bool = True) -> list[tuple[float, int]]:
    """Per response, in the order given: the summed negative log-likelihood (nats) of its tokens (+ EOS) given its
    prompt, and their count (a perplexity's interval resamples these pairs).

    Batches group examples of similar length, and hold at most batch_size examples and LOGITS_BUDGET logits' worth
    of tokens (a 262k-word vocabulary makes [B, T, V] float32 logits gigabytes at an ordinary batch size); a batch
    runs packed end to end, the leading tokens its prompts share laid down once (model.Packed), and the head runs
    at the response positions only.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    examples = [(tokenizer.prompt_ids(p, template), response_ids(tokenizer, r)) for p, r in zip(prompts, responses)]
    order = sorted(range(len(examples)), key=lambda i: sum(map(len, examples[i])))
    device = model.model.embed_tokens.weight.device
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    widths = [sum(map(len, examples[i])) for i in order]
    with fast_inference(model):
        batches = length_batches(widths, batch_size, LOGITS_BUDGET // model.config.vocab_size)
        for rows in tqdm(batches, desc="perplexity", disable=not progress):
            batch = [examples[order[i]] for i in rows]
            packed = Packed([p + r for p, r in batch], [len(p) for p, _ in batch], device)
            hidden = model(packed.tokens, skip_head=True, packed=packed)
            # A response's tokens are predicted from the positions before them, wherever the packed row holds those
            # (none for an empty response and a tokenizer without EOS).
            before = torch.cat([packed.slots[row, len(p) - 1:len(p) + len(r) - 1] for row, (p, r) in enumerate(batch)])
            targets = torch.tensor([token for _, r in batch for token in r], dtype=torch.long, device=device)
            logits = model.logits(hidden[0, before])
            nll = F.cross_entropy(logits, targets, reduction="none").double()
            for i, row_nll in zip(rows, nll.split([len(response) for _, response in batch])):
                scores[order[i]] = (float(row_nll.sum()), len(row_nll))
    return scores


def response_nll(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str],
                 template: str = "chat", batch_size: int = 8, progress: bool = True) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of all the response tokens (+ EOS) given their prompts, and their count."""
    scores = response_nlls(model, tokenizer, prompts, responses, template, batch_size, progress)
    return sum(nll for nll, _ in scores), sum(count for _, count in scores)


def perplexity(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str],
               template: str = "chat", batch_size: int = 8, progress: bool = True) -> float:
    """exp(mean NLL per response token), teacher-forced over all the responses."""
    total, count = response_nll(model, tokenizer, prompts, responses, template, batch_size, progress)
    return math.exp(total / count)
