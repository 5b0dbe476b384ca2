"""Batched generation with a KV cache: greedy or temperature / top-p sampling, left-padded prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from minisafe.model import KVCache, Transformer
from minisafe.tokenizer import Tokenizer


@dataclass
class Generation:
    texts: list[str]  # decoded new text per prompt, cut at the first stop string
    ids: list[list[int]]  # new token ids per prompt, up to and including the first EOS


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Greedy when temperature == 0; otherwise sample from the smallest set of tokens holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(-1)
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
                 generator: torch.Generator | None = None, stop: Callable[[Tensor], Tensor] | None = None
                 ) -> tuple[Tensor, Tensor]:
    """New tokens [B, <= max_new_tokens] for a left-padded batch, and each row's length up to and including its end.

    A row ends at an EOS id or when `stop(new_ids) -> BoolTensor [B]` says so (stop strings); after that it holds pad_id.
    """
    batch, length = input_ids.shape
    device = model.model.embed_tokens.weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    cache = KVCache(model.config, batch, length + max_new_tokens, model.model.embed_tokens.weight.dtype, device)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    new: list[Tensor] = []
    logits = model(input_ids, attention_mask, cache=cache, last_logits_only=True)
    for _ in range(max_new_tokens):
        token = next_token(logits[:, -1], temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        new.append(token)
        lengths += ~finished
        finished |= torch.isin(token, eos)
        if stop is not None:
            finished |= stop(torch.stack(new, dim=1)).to(device)
        if bool(finished.all()) or len(new) == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        logits = model(token[:, None], attention_mask, cache=cache)
    return (torch.stack(new, dim=1) if new else input_ids.new_zeros(batch, 0)), lengths


def generate(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int = 64,
             batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop_strings: Sequence[str] = (), progress: bool = True) -> Generation:
    """Continue every prompt (token ids, e.g. from tokenizer.prompt_ids); batches group prompts of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    generator = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    ids: list[list[int]] = [[] for _ in prompts]
    stop = _stop_checker(tokenizer, stop_strings) if stop_strings else None
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask = tokenizer.pad_left([prompts[i] for i in rows])
        new, lengths = generate_ids(model, input_ids, mask, max_new_tokens, tokenizer.eos_token_ids,
                                    tokenizer.pad_token_id, temperature, top_p, generator, stop)
        for row, tokens, n in zip(rows, new.tolist(), lengths.tolist()):
            ids[row] = tokens[:n]
        bar.update(len(rows))
    bar.close()
    texts = [_cut_at_stop(tokenizer.decode(t), stop_strings) for t in ids]
    return Generation(texts=texts, ids=ids)


def _stop_checker(tokenizer: Tokenizer, stop_strings: Sequence[str]):
    def stop(new_ids: Tensor) -> Tensor:
        texts = [tokenizer.decode(row) for row in new_ids.tolist()]
        return torch.tensor([any(s in t for s in stop_strings) for t in texts])
    return stop


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
