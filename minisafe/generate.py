"""Batched generation with a KV cache: greedy or temperature / top-p sampling, left-padded prompts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from minisafe.fastpath import fast_inference
from minisafe.model import Transformer
from minisafe.tokenizer import Tokenizer


@dataclass
class Generation:
    texts: list[str]  # decoded new text per prompt, cut at the first stop string
    ids: list[list[int]]  # new token ids per prompt, up to and including the first EOS


def greedy(logits: Tensor) -> Tensor:
    """logits [B, V].argmax(-1), the same first maximum found faster.

    CPU argmax over a vocabulary is a scalar loop and amax is vectorised: amax finds the first chunk holding a row's
    maximum and argmax runs inside it alone.
    """
    batch, vocab = logits.shape
    chunk = math.gcd(vocab, 1024)
    chunks = logits.reshape(batch, vocab // chunk, chunk)
    first = chunks.amax(-1).argmax(-1)
    return first * chunk + chunks[torch.arange(batch, device=logits.device), first].argmax(-1)


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Greedy when temperature == 0; otherwise sample from the smallest set of tokens holding top_p of the mass."""
    if temperature == 0:
        return greedy(logits)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model: Transformer, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, stop: Callable[[Tensor], Tensor] | None = None,
                 prefix_ids: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """New tokens [B, <= max_new_tokens] for a left-padded batch, and each row's length up to and including its end.

    prefix_ids: tokens every row starts with, before its own input_ids; their keys and values are computed once
    and shared (chat templates open every prompt with the same system turn).
    A row ends at an EOS id or when `stop(new_ids) -> BoolTensor [B]` says so (stop strings); after that it holds pad_id.
    """
    with fast_inference(model):
        batch, length = input_ids.shape
        device = model.model.embed_tokens.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # The last new token is never fed back, so the cache holds one position fewer than prompt and answer.
        positions = len(prefix_ids) + length + max(max_new_tokens - 1, 0)
        cache = model.new_cache(batch, positions)
        if prefix_ids:
            shared = model.new_cache(1, len(prefix_ids))
            model(torch.tensor([list(prefix_ids)], device=device), cache=shared, last_logits_only=True)
            cache.share(shared)
            # The prefix sits before each row's left padding: positions count real tokens, so the row reads as unpadded.
            attention_mask = torch.cat([attention_mask.new_ones(batch, len(prefix_ids)), attention_mask], dim=1)
        eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        rows = torch.arange(batch, device=device)  # the batch row of each row still being decoded
        finished = torch.zeros(batch, dtype=torch.bool, device=device)  # of those rows
        float_logits = temperature > 0  # greedy decoding takes the same argmax from the activation dtype
        logits = model(input_ids, attention_mask, cache=cache, last_logits_only=True, float_logits=float_logits)
        steps = 0
        while steps < max_new_tokens:
            token = next_token(logits[:, -1], temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            out[rows, steps] = token
            lengths[rows] += ~finished
            finished |= torch.isin(token, eos)
            steps += 1
            if stop is not None:
                finished |= stop(out[rows, :steps]).to(device)
            if bool(finished.all()) or steps == max_new_tokens:
                break
            # Finished rows would keep costing a full row per step; once a quarter of the batch is done, drop them at
            # the price of one copy of the cache.
            if finished.sum() * 4 >= len(rows):
                keep = (~finished).nonzero().squeeze(1)
                rows, finished, token, attention_mask = rows[keep], finished[keep], token[keep], attention_mask[keep]
                cache.keep_rows(keep)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            logits = model(token[:, None], attention_mask, cache=cache, float_logits=float_logits)
        return out[:, :steps], lengths


def generate(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int = 64,
             batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop_strings: Sequence[str] = (), progress: bool = True) -> Generation:
    """Continue every prompt (token ids, e.g. from tokenizer.prompt_ids); batches group prompts of similar length."""
    generator = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    ids: list[list[int]] = [[] for _ in prompts]
    stop = _stop_checker(tokenizer, stop_strings) if stop_strings else None
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    with fast_inference(model):  # once for all batches, so the weights are packed once
        for rows in similar_length_batches(prompts, batch_size):
            prefix = shared_prefix([prompts[i] for i in rows])
            input_ids, mask = tokenizer.pad_left([prompts[i][len(prefix):] for i in rows])
            new, lengths = generate_ids(model, input_ids, mask, max_new_tokens, tokenizer.eos_token_ids,
                                        tokenizer.pad_token_id, temperature, top_p, generator, stop, prefix)
            for row, tokens, n in zip(rows, new.tolist(), lengths.tolist()):
                ids[row] = tokens[:n]
            bar.update(len(rows))
    bar.close()
    texts = [_cut_at_stop(tokenizer.decode(t), stop_strings) for t in ids]
    return Generation(texts=texts, ids=ids)


def similar_length_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of at most batch_size, shortest prompts first, so that a batch needs little padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def shared_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The leading tokens all prompts have in common, leaving each at least one token of its own to continue from."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return list(prompts[0][:n])


def _stop_checker(tokenizer: Tokenizer, stop_strings: Sequence[str]):
    def stop(new_ids: Tensor) -> Tensor:
        texts = [tokenizer.decode(row) for row in new_ids.tolist()]
        return torch.tensor([any(s in t for s in stop_strings) for t in texts])
    return stop


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
