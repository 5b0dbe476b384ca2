"""fast_inference, the CPU speed path: the plain model's logits and generations, hooks that still fire, weight
changes that take effect inside it, and the model's own methods back on exit."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import minisafe
from minisafe.fastpath import GrowingKVCache, fast_inference
from minisafe.generate import generate_ids
from minisafe.hooks import record_layers, scaled_layers
from minisafe.analysis import record_mlp_inputs
from minisafe.model import KVCache
from test_model_parity import (TOL, decode_steps, left_padded_batch, pair,  # noqa: F401  (pair: a fixture)
                               prompt_and_steps)
from tiny import save_tiny

SWAPPABLE = ("forward", "project", "attend", "head", "new_cache")


def swapped_methods(model) -> set[tuple[str, str]]:
    """(module name, method) of every method a fast_inference block has put on one of the model's modules."""
    return {(name, method) for name, m in model.named_modules() for method in SWAPPABLE if method in vars(m)}


@contextmanager
def outputs_of(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of every call of `module` inside the block, from a forward hook."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def count_packed_matmuls(monkeypatch) -> list[int]:
    """Count the calls of the packed-weight kernel from here on."""
    calls = []
    kernel = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or kernel(*args))
    return calls


def count_plain_matmuls(monkeypatch) -> list[int]:
    """Count the calls of F.linear from here on."""
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: calls.append(1) or linear(*args))
    return calls


@torch.no_grad()
def test_logits_with_fast_inference_match_transformers(pair, monkeypatch):
    _, hf, model, _ = pair
    ids, mask, pos = left_padded_batch()
    expected = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    calls = count_packed_matmuls(monkeypatch)
    plain = count_plain_matmuls(monkeypatch)
    with fast_inference(model):
        got = model(ids, mask)
    assert not plain  # every matmul ran packed: per layer q/k/v stacked, o, gate/up stacked, down; then the head
    assert len(calls) == 4 * len(model.layers) + 1
    assert (got - expected)[mask.bool()].abs().max() <= TOL
    assert not swapped_methods(model)


@torch.no_grad()
def test_fast_decoding_gives_the_logits_and_greedy_tokens_of_the_plain_model(pair):
    _, _, model, _ = pair
    ids, mask, steps, max_len = prompt_and_steps(lengths=(6, 11, 3), seed=1)
    plain, _ = decode_steps(model, model.new_cache(3, max_len), ids, mask, steps)
    with fast_inference(model):
        cache = model.new_cache(3, max_len)
        fast, _ = decode_steps(model, cache, ids, mask, steps)
    assert isinstance(cache, GrowingKVCache) and (fast - plain).abs().max() <= TOL
    assert torch.equal(generate_ids(model, ids, mask, max_new_tokens=20, eos_ids=[], pad_id=0)[0],
                       plain_greedy(model, ids, mask, 20))


def plain_greedy(model, ids, mask, new: int) -> torch.Tensor:
    """`new` greedy tokens [B, new] from the plain model, one step at a time through its own KV cache."""
    cache = model.new_cache(len(ids), ids.shape[1] + new - 1)
    logits, tokens = model(ids, mask, cache=cache, last_logits_only=True), []
    while True:
        tokens.append(logits[:, -1].argmax(-1))
        if len(tokens) == new:
            return torch.stack(tokens, dim=1)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        logits = model(tokens[-1][:, None], mask, cache=cache)


@torch.no_grad()
def test_growing_kv_cache_grows_by_its_step_and_gives_the_same_logits_as_a_full_one(pair):
    _, _, model, _ = pair
    ids, mask, steps, max_len = prompt_and_steps()
    logits, capacities = {}, []
    with fast_inference(model):
        for grow in (4, max_len):
            cache = GrowingKVCache(model.config, 3, max_len, torch.float32, "cpu", grow=grow)
            logits[grow], grown = decode_steps(model, cache, ids, mask, steps)
            capacities += grown
    # After the prompt a buffer holds grow - 1 more slots and grows by `grow` when full, straight to max_len when
    # less than `grow` would be left.
    width = ids.shape[1]
    assert max_len == width + 12
    assert capacities[:12] == [width + 3] * 3 + [width + 7] * 4 + [max_len] * 5
    assert capacities[12:] == [max_len] * 12
    assert (logits[4] - logits[max_len]).abs().max() <= TOL
    with pytest.raises(ValueError, match=f"KV cache holds {max_len} positions; this step needs {max_len + 1}"):
        model(steps[:, :1], torch.cat([mask, torch.ones(3, 13, dtype=mask.dtype)], dim=1), cache=cache)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2_tied_sliding"])
def test_fast_inference_is_bit_identical_in_bfloat16(tmp_path, family):
    save_tiny(tmp_path, family)
    model, _ = minisafe.load(tmp_path, dtype=torch.bfloat16)
    ids, mask, _ = left_padded_batch()
    plain = model(ids, mask)
    with fast_inference(model):
        assert torch.equal(model(ids, mask), plain)


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_layer_and_mlp_input_hooks_fire_inside_and_record_what_they_record_outside(tmp_path, family):
    save_tiny(tmp_path, family)
    model, _ = minisafe.load(tmp_path)
    ids, mask, _ = left_padded_batch()
    recorded = []
    for fast in (False, True):
        with record_layers(model) as layers, record_mlp_inputs(model) as mlp_inputs:
            if fast:
                with fast_inference(model):
                    model(ids, mask, last_logits_only=True)
            else:
                model(ids, mask, last_logits_only=True)
        recorded.append([*layers.values(), *mlp_inputs.values()])
    plain, fast = recorded
    assert len(plain) == len(fast) == 2 * len(model.layers)
    assert all(len(a) == len(b) == 1 and (a[0] - b[0]).abs().max() <= TOL for a, b in zip(plain, fast))


@torch.no_grad()
def test_a_hook_on_a_stacked_projection_still_sees_it_run(tmp_path):
    save_tiny(tmp_path, "qwen2")
    model, _ = minisafe.load(tmp_path)
    ids, mask, _ = left_padded_batch()
    with outputs_of(model.layers[1].self_attn.k_proj) as seen:
        plain = model(ids, mask)
        with fast_inference(model):
            packed = model(ids, mask)
    assert len(seen) == 2 and (seen[1] - seen[0]).abs().max() <= TOL and (packed - plain).abs().max() <= TOL


@torch.no_grad()
def test_a_hook_registered_inside_the_block_fires_on_a_stacked_projection(tmp_path):
    save_tiny(tmp_path, "llama")
    model, _ = minisafe.load(tmp_path)
    ids, mask, _ = left_padded_batch()
    with fast_inference(model), outputs_of(model.layers[0].mlp.up_proj) as seen:  # hooked after the swaps
        model(ids, mask)
    assert len(seen) == 1 and seen[0].shape == (*ids.shape, model.config.intermediate_size)


def test_fast_inference_never_uses_a_stale_or_gradless_copy(tmp_path, monkeypatch):
    """Weights changed inside the block (scaling, an optimizer step), training passes and autocast take the weights."""
    save_tiny(tmp_path, "llama_tied_bias_linear")
    model, _ = minisafe.load(tmp_path)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad(), scaled_layers(model, 0, 1, 1.7):
        scaled = model(ids, mask)
    with torch.no_grad(), fast_inference(model), scaled_layers(model, 0, 1, 1.7):  # scaled after packing
        assert (model(ids, mask) - scaled).abs().max() <= TOL
    with torch.no_grad(), fast_inference(model):
        model.model.embed_tokens.weight.mul_(0.5)  # also the tied head's weight
        changed = model(ids, mask)
    with torch.no_grad():
        assert (changed - model(ids, mask)).abs().max() <= TOL
        model.model.embed_tokens.weight.mul_(2.0)

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = gradients()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(ids, mask)
    calls = count_packed_matmuls(monkeypatch)
    with fast_inference(model):
        got = gradients()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(ids, mask), autocast)
    assert not calls and all(torch.equal(a, b) for a, b in zip(got, expected))


@torch.no_grad()
def test_weights_scaled_and_restored_inside_the_block_are_packed_again(tmp_path, monkeypatch):
    """Scaling entered before the block, inside it, and left inside it: each pass runs packed on the current weights."""
    save_tiny(tmp_path, "qwen2")
    model, _ = minisafe.load(tmp_path)
    ids, mask, _ = left_padded_batch()
    unscaled = model(ids, mask)
    with scaled_layers(model, 1, 2, 0.6):
        scaled = model(ids, mask)
        with fast_inference(model):  # scaled before packing
            assert (model(ids, mask) - scaled).abs().max() <= TOL
    plain = count_plain_matmuls(monkeypatch)
    with fast_inference(model):
        with scaled_layers(model, 1, 2, 0.6):
            inside = model(ids, mask)
        restored = model(ids, mask)
    assert not plain  # the changed weights were packed again, not left to F.linear
    assert (inside - scaled).abs().max() <= TOL and (restored - unscaled).abs().max() <= TOL


@torch.no_grad()
def test_the_models_own_methods_come_back_on_exit_and_when_an_exception_escapes(tmp_path):
    save_tiny(tmp_path, "llama_tied_bias_linear")
    model, _ = minisafe.load(tmp_path)
    with fast_inference(model):
        inside = swapped_methods(model)
    with pytest.raises(RuntimeError, match="inside"):
        with fast_inference(model):
            raise RuntimeError("inside")
    assert {("", "new_cache"), ("", "head"), ("model.layers.0.self_attn", "attend"),
            ("model.layers.0.self_attn", "project"), ("model.layers.0.mlp", "project"),
            ("model.layers.0.self_attn.o_proj", "forward")} <= inside
    assert not swapped_methods(model) and type(model.new_cache(1, 4)) is KVCache


@torch.no_grad()
def test_nested_blocks_share_the_outer_blocks_swaps_undone_by_the_outer_block(tmp_path):
    save_tiny(tmp_path, "qwen2")
    model, _ = minisafe.load(tmp_path)
    head = model.lm_head
    with pytest.raises(RuntimeError, match="inside"):
        with fast_inference(model):
            outer = vars(head)["forward"]
            with fast_inference(model):
                assert vars(head)["forward"] is outer
            assert vars(head)["forward"] is outer  # the inner block leaves the outer one's swap in place
            raise RuntimeError("inside")
    assert "forward" not in vars(head)


@torch.no_grad()
def test_a_weight_replaced_inside_the_block_is_the_one_used(tmp_path):
    save_tiny(tmp_path, "qwen2")
    model, _ = minisafe.load(tmp_path)
    ids, mask, _ = left_padded_batch()
    with fast_inference(model):
        before = model(ids, mask)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight * 2)
        inside = model(ids, mask)
    assert (inside - 2 * before).abs().max() <= TOL and (inside - model(ids, mask)).abs().max() <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_fast_training_gives_the_loss_and_gradients_of_the_plain_model(tmp_path, family):
    from minisafe.fastpath import fast_training
    from minisafe.objectives import IGNORE, sft_loss_sum

    save_tiny(tmp_path, family)
    model, _ = minisafe.load(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = IGNORE

    def loss_and_grads():
        model.zero_grad()
        loss = sft_loss_sum(model(ids, skip_head=True), labels, model.logits)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = loss_and_grads()
    with fast_training(model):
        fast = loss_and_grads()
        assert type(model.model.embed_tokens(ids).grad_fn).__name__ == "EmbeddingRowsBackward"
    assert "attend" not in model.layers[0].self_attn.__dict__  # the plain methods are back
    assert "forward" not in model.model.embed_tokens.__dict__
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    for name, grad in plain[1].items():
        torch.testing.assert_close(fast[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # a tied head and a separate one
def test_fast_training_adds_the_embedding_gradient_to_one_already_there(tmp_path, family):
    """Two passes without zeroing in between (gradient accumulation, and the training loop's zeroed buffers): the
    embedding's rows are added to what .grad holds, the tied head's gradient too."""
    from minisafe.fastpath import fast_training

    save_tiny(tmp_path, family)
    model, _ = minisafe.load(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[1, :3] = ids[0, 0]  # a token seen several times: its rows add up

    head = model.model.embed_tokens if model.lm_head is None else model.lm_head

    def two_passes() -> list[torch.Tensor]:
        model.zero_grad()
        for scale in (1.0, 3.0):
            (model(ids).float().square().mean() * scale).backward()
        return [model.model.embed_tokens.weight.grad.clone(), head.weight.grad.clone()]

    plain = two_passes()
    with fast_training(model):
        fast = two_passes()
        assert type(model(ids).grad_fn).__name__ == "HeadRowsBackward"
    for got, expected in zip(fast, plain):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # a tied head and a separate one
def test_fast_training_head_under_autocast_matches_autocast_and_follows_a_changed_weight(tmp_path, family):
    """The head's bfloat16 copy of its weight is made again after the weight changes in place (an optimizer step),
    and its logits and gradient (added to .grad a block of rows at a time) are autocast's up to bfloat16 rounding."""
    from minisafe import fastpath

    save_tiny(tmp_path, family)
    model, _ = minisafe.load(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    weight = (model.model.embed_tokens if model.lm_head is None else model.lm_head).weight

    def logits_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids, float_logits=False)
        logits.float().square().mean().backward()
        return logits.detach(), weight.grad.clone()

    def halve() -> None:
        with torch.no_grad():
            weight.mul_(0.5)

    plain = [logits_and_grad()]
    halve()
    plain.append(logits_and_grad())
    with torch.no_grad():
        weight.mul_(2.0)
    with pytest.MonkeyPatch.context() as patch, fastpath.fast_training(model):
        patch.setattr(fastpath, "HEAD_ROWS", 7)  # several blocks of rows, the last one short
        fast = [logits_and_grad()]
        halve()  # inside the block, after the weight's bfloat16 copy was made
        fast.append(logits_and_grad())
    for got, expected in zip(fast, plain):  # matmul attention rounds otherwise than the plain fused kernel
        torch.testing.assert_close(got[0], expected[0], rtol=1.6e-2, atol=1e-3)
        torch.testing.assert_close(got[1], expected[1], rtol=1.6e-2, atol=1e-5)


def test_fast_training_leaves_an_embedding_with_a_gradient_hook_to_the_plain_lookup(tmp_path):
    """A hook on the weight (as NFFT puts on projections) must see the whole gradient: the plain lookup keeps it."""
    from minisafe.fastpath import fast_training

    save_tiny(tmp_path, "llama")
    model, _ = minisafe.load(tmp_path)
    seen = []
    model.model.embed_tokens.weight.register_hook(lambda grad: seen.append(grad.shape))
    with fast_training(model):
        out = model.model.embed_tokens(torch.tensor([[1, 2, 3]]))
        assert type(out.grad_fn).__name__ == "EmbeddingBackward0"
        out.sum().backward()
    assert seen == [model.model.embed_tokens.weight.shape]


def autocast_sft_gradients(model, ids, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed SFT loss under bfloat16 autocast (the head at labelled positions) and the gradient of every
    trained parameter, from zeroed gradients."""
    from minisafe.objectives import sft_loss_sum

    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sft_loss_sum(model(ids, skip_head=True), labels, model.logits)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_fast_training_linears_under_autocast_give_autocasts_loss_and_gradients(tmp_path, family):
    """Under bfloat16 autocast the layers' linears run stacked by kept bfloat16 copies (CastWeights), their weight
    gradients added straight into .grad (LinearRows); a frozen layer multiplies by its copy. Loss and gradients are
    autocast's up to bfloat16 rounding (the stacked input gradient is one matmul instead of a sum of several)."""
    from minisafe.fastpath import fast_training
    from minisafe.objectives import IGNORE

    save_tiny(tmp_path, family)
    model, _ = minisafe.load(tmp_path)
    for p in model.layers[1].parameters():
        p.requires_grad_(False)  # SPPFT-style: a frozen layer among trainable ones
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = IGNORE

    plain = autocast_sft_gradients(model, ids, labels)
    with fast_training(model):
        fast = autocast_sft_gradients(model, ids, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model.layers[0].mlp.down_proj(torch.randn(2, model.config.intermediate_size))
        assert type(y.grad_fn).__name__ == "LinearRowsBackward"
    assert "project" not in model.layers[0].mlp.__dict__  # the plain methods are back
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-3, atol=1e-3)
    apart = sum((fast[1][n] - g).square().sum() for n, g in plain[1].items())
    assert (apart / sum(g.square().sum() for g in plain[1].values())).sqrt() < 0.02


def test_cast_weights_multiply_by_their_packed_copy_as_f_linear_does_and_follow_a_changed_weight():
    """The linears' bfloat16 stack is multiplied by a oneDNN-blocked copy of it: the same numbers as F.linear's, and
    after an in-place write (an optimizer step) by a copy made again."""
    from minisafe.fastpath import CastWeights, packable

    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(24, 16, generator=g), torch.randn(8, 16, generator=g)]
    x = torch.randn(3, 5, 16, generator=g).to(torch.bfloat16)
    copy = CastWeights(packed=True)
    for _ in range(2):
        low = copy(weights, torch.bfloat16)
        assert (copy.blocked is not None) == packable(low)
        assert torch.equal(copy.linear(x, low), torch.nn.functional.linear(x, torch.cat(weights).to(torch.bfloat16)))
        weights[1].mul_(-3.0)


def test_a_frozen_layer_passes_the_gradient_down_under_autocast(tmp_path):
    """SPPFT: the layers below a frozen one train on the gradient that crosses it. With the frozen layer's linears
    multiplied by their packed copies (a kernel with no backward of its own), the gradients below it are still
    autocast's, tensor by tensor."""
    from minisafe.fastpath import fast_training
    from minisafe.objectives import IGNORE

    save_tiny(tmp_path, "llama")
    model, _ = minisafe.load(tmp_path)
    for p in model.layers[-1].parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :3] = IGNORE

    plain = autocast_sft_gradients(model, ids, labels)[1]
    with fast_training(model):
        fast = autocast_sft_gradients(model, ids, labels)[1]
    below = [name for name in plain if name.startswith("model.layers.0.")]
    assert below
    for name in below:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(fast[name], plain[name], rtol=3e-2, atol=1e-3, msg=name)
