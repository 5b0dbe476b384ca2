"""The hand-written model equals transformers on tiny random checkpoints of every family (float32)."""

import pytest
import torch

import minisafe
from minisafe.generate import generate, generate_ids, greedy, shared_prefix
from minisafe.model import KVCache
from tiny import FAMILIES, save_tiny

TOL = 1e-4


def left_padded_batch(lengths=(14, 9, 20), vocab=250, seed=0):
    """Random ids [B, T] with rows of different lengths, left-padded, and the positions transformers needs."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        ids[row, : width - n] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, transformers model, minisafe model, tokenizer) from one saved tiny checkpoint."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(path, request.param)
    model, tok = minisafe.load(path)
    return request.param, hf, model, tok


@torch.no_grad()
def test_logits_match_transformers_on_left_padded_batch(pair):
    _, hf, model, _ = pair
    ids, mask, pos = left_padded_batch()
    expected = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = model(ids, mask)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected)[mask.bool()].abs().max() <= TOL


@torch.no_grad()
def test_padded_row_gives_the_logits_of_the_unpadded_row(pair):
    _, _, model, _ = pair
    ids, mask, _ = left_padded_batch()
    batched = model(ids, mask)
    alone = model(ids[1:2, mask[1].argmax():])
    assert (batched[1, mask[1].bool()] - alone[0]).abs().max() <= TOL


@torch.no_grad()
def test_every_layer_output_matches_transformers(pair):
    _, hf, model, _ = pair
    ids, mask, pos = left_padded_batch()
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
    _, hidden = model(ids, mask, return_hidden=True)
    assert len(hidden) == model.config.num_layers == len(ref) - 1
    real = mask.bool()
    for i, h in enumerate(hidden[:-1]):  # ref[0] is the embedding output, ref[i + 1] the output of layer i
        assert (h - ref[i + 1])[real].abs().max() <= TOL, f"layer {i}"
    # transformers reports the last layer after the final norm; minisafe reports it before, so norm it here.
    assert (model.model.norm(hidden[-1]) - ref[-1])[real].abs().max() <= TOL


@torch.no_grad()
def test_last_logits_only_equals_the_last_position_of_the_full_pass(pair):
    """A hook on the last layer still sees every position."""
    _, _, model, _ = pair
    ids, mask, _ = left_padded_batch()
    full = model(ids, mask)
    last = model(ids, mask, last_logits_only=True)
    assert last.shape == (3, 1, full.shape[-1]) and (last - full[:, -1:]).abs().max() <= TOL
    seen = []
    handle = model.layers[-1].register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        hooked = model(ids, mask, last_logits_only=True)
    finally:
        handle.remove()
    assert seen[0].shape[:2] == ids.shape and (hooked - last).abs().max() <= TOL


def decode_steps(model, cache, ids, mask, steps) -> tuple[torch.Tensor, list[int]]:
    """Logits [B, 1 + S, V] of a prompt pass and then of one step per column of steps [B, S], through `cache`; and the
    length of layer 0's key buffer after each step."""
    out, capacities = [model(ids, mask, cache=cache, last_logits_only=True)], []
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        out.append(model(steps[:, t : t + 1], mask, cache=cache))
        capacities.append(cache.keys[0].shape[2])
    return torch.cat(out, dim=1), capacities


def prompt_and_steps(lengths=(14, 9, 20), seed=0):
    """A left-padded prompt batch, 12 tokens per row to feed one at a time after it, and the positions both fill."""
    ids, mask, _ = left_padded_batch(lengths, seed=seed)
    steps = torch.randint(5, 250, (len(lengths), 12), generator=torch.Generator().manual_seed(7))
    return ids, mask, steps, ids.shape[1] + steps.shape[1]


@torch.no_grad()
def test_kv_cache_steps_give_the_logits_of_the_full_pass(pair):
    _, _, model, _ = pair
    ids, mask, steps, max_len = prompt_and_steps()
    cache = KVCache(model.config, 3, max_len, torch.float32, "cpu")
    stepped, _ = decode_steps(model, cache, ids, mask, steps)
    full = model(torch.cat([ids, steps], dim=1), torch.cat([mask, torch.ones_like(steps)], dim=1))
    assert (stepped - full[:, ids.shape[1] - 1 :]).abs().max() <= TOL
    with pytest.raises(ValueError, match=f"KV cache holds {max_len} positions; this step needs {max_len + 1}"):
        model(steps[:, :1], torch.ones(3, max_len + 1, dtype=torch.long), cache=cache)


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(pair):
    _, hf, model, tok = pair
    ids, mask, _ = left_padded_batch(lengths=(6, 11, 3), seed=1)
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got, lengths = generate_ids(model, ids, mask, max_new_tokens=20, eos_ids=[], pad_id=0)
    assert lengths.tolist() == [20, 20, 20]
    assert got.tolist() == expected.tolist()


@torch.no_grad()
def test_padding_inside_a_row_gives_the_logits_of_the_unpadded_row(pair):
    """A gap between a shared prefix and a row's own tokens is invisible, sliding windows included."""
    _, _, model, _ = pair
    ids, mask, _ = left_padded_batch()
    gapped = torch.cat([ids[:, :4], torch.zeros_like(ids[:, :5]), ids[:, 4:]], dim=1)
    gapped_mask = torch.cat([torch.ones_like(mask[:, :4]), torch.zeros_like(mask[:, :5]), mask[:, 4:]], dim=1)
    row = 2  # the longest row: its first four tokens are real, so the gap splits it
    alone = model(ids[row : row + 1])[0]
    got = model(gapped, gapped_mask)[row, gapped_mask[row].bool()]
    assert (got - alone).abs().max() <= TOL


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 250, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def test_generation_from_a_shared_prefix_matches_transformers_on_the_whole_prompts(pair):
    _, hf, model, tok = pair
    [prefix] = random_prompts([7], seed=2)
    own = random_prompts([6, 11, 3], seed=3)
    whole, whole_mask = tok.pad_left([prefix + o for o in own])
    expected = hf.generate(input_ids=whole, attention_mask=whole_mask, max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=tok.pad_token_id)[:, whole.shape[1]:]
    ids, mask = tok.pad_left(own)
    got, _ = generate_ids(model, ids, mask, max_new_tokens=20, eos_ids=[], pad_id=tok.pad_token_id, prefix_ids=prefix)
    assert got.tolist() == expected.tolist()


@torch.no_grad()
def test_generate_shares_the_common_prefix_and_matches_each_prompt_alone(pair, monkeypatch):
    _, _, model, tok = pair
    [prefix] = random_prompts([5], seed=4)
    prompts = [prefix + o for o in random_prompts([3, 8, 1, 6], seed=5)]
    monkeypatch.setattr(tok, "eos_token_ids", [])
    together = generate(model, tok, prompts, max_new_tokens=12, batch_size=4, progress=False).ids
    alone = [generate_ids(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), max_new_tokens=12,
                          eos_ids=[], pad_id=tok.pad_token_id)[0][0].tolist() for p in prompts]
    assert together == alone


def early_end_token(rows: list[list[int]]) -> int:
    """A token that ends at least two rows within four steps while some row runs on past it."""
    def end(row, t):
        return row.index(t) + 1 if t in row else len(row) + 1
    for t in dict.fromkeys(t for row in rows for t in row[:4]):
        ends = sorted(end(row, t) for row in rows)
        if ends[1] <= 4 and ends[-1] > ends[1] + 1:
            return t
    raise AssertionError("no token ends two rows early here; change the seed")


@torch.no_grad()
def test_rows_that_end_early_are_dropped_without_changing_the_others(tmp_path, monkeypatch):
    """With an EOS id that some rows reach early, every row equals its EOS-free continuation cut after that EOS.

    Dropping rows is the same code for every family; phi3's tiny model is one whose rows do not all repeat a token.
    """
    save_tiny(tmp_path, "phi3")
    model, tok = minisafe.load(tmp_path)
    ids, mask = tok.pad_left(random_prompts([6, 11, 3, 8, 5, 9, 4, 7], seed=6))
    pad = tok.pad_token_id
    free = generate_ids(model, ids, mask, max_new_tokens=16, eos_ids=[], pad_id=pad)[0].tolist()
    eos = early_end_token(free)
    kept = []
    keep_rows = KVCache.keep_rows
    monkeypatch.setattr(KVCache, "keep_rows", lambda cache, rows: kept.append(len(rows)) or keep_rows(cache, rows))
    got, lengths = generate_ids(model, ids, mask, max_new_tokens=16, eos_ids=[eos], pad_id=pad)
    assert kept, "no row was dropped"
    for row, full, n in zip(got.tolist(), free, lengths.tolist()):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert n == end and row[:n] == full[:n] and set(row[n:]) <= {pad}


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3, 4, 5]]) == [1, 2, 3]
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert shared_prefix([[7, 1], [8, 1]]) == []
    assert shared_prefix([[5]]) == []


@pytest.mark.parametrize("vocab", [49152, 151936, 250, 97])
def test_greedy_picks_the_first_maximum_as_argmax_does(vocab):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[1, [3, vocab - 2]] = logits[1].max() + 1  # a tie: the first one counts
    logits[2, -1] = logits[2].max() + 1  # in the last chunk
    logits[3, :] = 0.5  # all equal
    logits[4, 7] = float("nan")  # argmax takes NaN for the maximum
    assert torch.equal(greedy(logits), logits.argmax(-1))
    wide = torch.randn(6, 3, vocab)
    assert torch.equal(greedy(wide[:, -1]), wide[:, -1].argmax(-1))  # a strided view, as generation passes


@torch.no_grad()
def test_phi3_long_context_switches_to_long_rope_factors(tmp_path):
    hf = save_tiny(tmp_path, "phi3")
    model, _ = minisafe.load(tmp_path)
    ids, mask, pos = left_padded_batch(lengths=(30, 24))  # beyond original_max_position_embeddings = 16
    assert (model(ids, mask) - hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits)[mask.bool()].abs().max() <= TOL
    assert model.long_inv_freq and not torch.equal(model.long_inv_freq["full_attention"], model.inv_freq["full_attention"])


@torch.no_grad()
def test_sharded_checkpoint_loads_and_matches(tmp_path):
    hf = save_tiny(tmp_path, "llama", max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = minisafe.load(tmp_path)
    ids, mask, pos = left_padded_batch()
    assert (model(ids, mask) - hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits)[mask.bool()].abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bfloat16_checkpoint_loads_and_matches_its_float32_expansion(tmp_path, family):
    save_tiny(tmp_path, family, dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    model, _ = minisafe.load(tmp_path, dtype=torch.float32)
    ids, mask, pos = left_padded_batch()
    assert (model(ids, mask) - hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits)[mask.bool()].abs().max() <= TOL
    model16, _ = minisafe.load(tmp_path, dtype=torch.bfloat16)
    assert model16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model16(ids, mask).dtype == torch.float32


@torch.no_grad()
def test_saved_model_loads_in_transformers_with_the_same_logits(tmp_path):
    save_tiny(tmp_path / "src", "qwen2_tied_sliding")
    model, tok = minisafe.load(tmp_path / "src")
    minisafe.save(model, tok, tmp_path / "out")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    ids, mask, pos = left_padded_batch()
    assert (model(ids, mask) - hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits)[mask.bool()].abs().max() <= TOL
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "Hello, wörld! 123"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    chat = [{"role": "user", "content": "Hi there"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tok.render_chat(chat)


def test_bfloat16_softmax_rounds_once_as_the_float32_one_does():
    """matmul_attention takes softmax in the activation dtype on this promise."""
    scores = (torch.randn(8, 3, 3, 97, generator=torch.Generator().manual_seed(0)) * 20).to(torch.bfloat16)
    scores[..., 60:] = float("-inf")  # the masked tail of a KV cache
    assert torch.equal(torch.softmax(scores, dim=-1), torch.softmax(scores, dim=-1, dtype=torch.float32).to(torch.bfloat16))
