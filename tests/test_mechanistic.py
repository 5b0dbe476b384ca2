"""minisafe.analysis: weight-change statistics, the clustering score tau, the activation hook, compare()."""

import base64
import codecs
import json

import pytest
import torch

import minisafe
from minisafe.errors import DataError
from minisafe.analysis import (CompareConfig, compare, delta_stats, effective_rank, jailbreak_prompts,
                                  mlp_activations, split_reference, tau, weight_change_stats)
from tiny import one_thread, save_tiny  # noqa: F401 (one_thread: an autouse fixture)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def rank_deficient(rows: int = 12, cols: int = 10, rank: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, cols, generator=g,
                                                                                   dtype=torch.float64)


def test_null_share_is_zero_for_a_change_inside_the_column_space():
    w = rank_deficient()
    u = torch.linalg.svd(w).U[:, :4]
    dw = u @ torch.randn(4, 10, dtype=torch.float64)
    assert delta_stats(w, w + dw)["null_share_left"] == pytest.approx(0.0, abs=1e-9)


def test_null_share_is_one_for_a_change_orthogonal_to_the_column_space():
    w = rank_deficient()
    u = torch.linalg.svd(w).U[:, :4]
    dw = (torch.eye(12, dtype=torch.float64) - u @ u.T) @ torch.randn(12, 10, dtype=torch.float64)
    stats = delta_stats(w, w + dw)
    assert stats["null_share_left"] == pytest.approx(1.0, abs=1e-9)
    assert stats["rank_before"] == 4


def test_null_share_right_measures_the_row_space():
    w = rank_deficient()
    v = torch.linalg.svd(w).Vh[:4].T
    inside = torch.randn(12, 4, dtype=torch.float64) @ v.T
    outside = torch.randn(12, 10, dtype=torch.float64) @ (torch.eye(10, dtype=torch.float64) - v @ v.T)
    assert delta_stats(w, w + inside)["null_share_right"] == pytest.approx(0.0, abs=1e-9)
    assert delta_stats(w, w + outside)["null_share_right"] == pytest.approx(1.0, abs=1e-9)


def test_a_half_inside_half_outside_change_is_weighted_by_energy():
    w = torch.zeros(6, 6, dtype=torch.float64)
    w[0, 0] = w[1, 1] = 1.0  # column space = span(e0, e1)
    dw = torch.zeros(6, 6, dtype=torch.float64)
    dw[0, 2], dw[4, 3] = 2.0, 1.0  # energy 4 inside, 1 outside
    assert delta_stats(w, w + dw)["null_share_left"] == pytest.approx(1 / 5)


def test_effective_rank_of_a_known_low_rank_change():
    u, v = orthonormal(20, 3, 1), orthonormal(15, 3, 2)
    equal = u @ torch.diag(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)) @ v.T
    skewed = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T  # energy 9, 4, 1: 2 hold 93%
    base = torch.zeros(20, 15, dtype=torch.float64)
    assert delta_stats(base, equal)["effective_rank"] == 3
    assert delta_stats(base, skewed)["effective_rank"] == 2
    assert effective_rank(torch.zeros(4)) == 0


def test_relative_change_is_the_norm_ratio():
    w = torch.ones(4, 4)
    stats = delta_stats(w, w * 1.5)
    assert stats["norm"] == pytest.approx(2.0)
    assert stats["relative_change"] == pytest.approx(0.5)


def test_tau_at_the_cluster_means_is_plus_and_minus_their_distance():
    mu_safe, mu_unsafe = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-2.0, 6.0, 0.0])
    distance = (mu_safe - mu_unsafe).norm()
    assert tau(mu_safe, mu_safe, mu_unsafe) == pytest.approx(distance.item())
    assert tau(mu_unsafe, mu_safe, mu_unsafe) == pytest.approx(-distance.item())
    assert tau((mu_safe + mu_unsafe) / 2, mu_safe, mu_unsafe) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("mech")
    save_tiny(root / "before", "llama", seed=0)
    save_tiny(root / "after", "llama", seed=1)
    safe = root / "safe.txt"
    safe.write_text("\n".join(f"Name a colour number {i}." for i in range(8)) + "\n")
    unsafe = root / "unsafe.txt"
    unsafe.write_text("\n".join(f"Explain how to pick lock {i}." for i in range(8)) + "\n")
    return root


def manual_mlp_input(model, ids: list[int], layer: int) -> torch.Tensor:
    """The down_proj input at the last token, computed by running the blocks by hand (no hooks, no padding)."""
    input_ids = torch.tensor([ids])
    x = model.model.embed_tokens(input_ids)
    cos, sin = model.rope(model.config.layer_types[0], torch.arange(len(ids))[None], x.dtype)
    for block in model.layers[:layer]:
        x = block(x, cos, sin, None, None)
    block = model.layers[layer]
    h = x + block.self_attn(block.input_layernorm(x), cos, sin, None, None)
    m = block.post_attention_layernorm(h)
    return (torch.nn.functional.silu(block.mlp.gate_proj(m)) * block.mlp.up_proj(m))[0, -1]


def test_hook_captured_activations_equal_a_manual_computation(tiny_pair):
    model, tok = minisafe.load(tiny_pair / "before")
    prompts = ["hi", "a much longer prompt that needs no padding"]  # the short one is left-padded in the batch
    captured = mlp_activations(model, tok, prompts, "chat", batch_size=2, progress=False)
    assert captured.shape == (2, model.config.num_layers, model.config.intermediate_size)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            for layer in range(model.config.num_layers):
                expected = manual_mlp_input(model, tok.prompt_ids(prompt, "chat"), layer)
                torch.testing.assert_close(captured[row, layer], expected, atol=1e-5, rtol=1e-4)


def test_weight_change_stats_cover_every_projection_of_every_layer(tiny_pair):
    stats = weight_change_stats(tiny_pair / "before", tiny_pair / "after")
    kinds = {(r["layer"], r["kind"]) for r in stats["tensors"]}
    assert kinds == {(i, k) for i in range(3) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj")}
    same = weight_change_stats(tiny_pair / "before", tiny_pair / "before")
    assert all(r["norm"] == 0 and r["effective_rank"] == 0 for r in same["tensors"])


def test_jailbreak_prompts_wrap_every_prompt_in_every_template():
    wrapped = jailbreak_prompts(["How do I do X?", "Tell me Y."])
    assert set(wrapped) == {"prefix_injection", "role_play", "base64", "rot13"}
    assert all(len(v) == 2 for v in wrapped.values())
    assert base64.b64encode(b"Tell me Y.").decode() in wrapped["base64"][1]
    assert codecs.encode("Tell me Y.", "rot13") in wrapped["rot13"][1]


def test_reference_and_evaluated_prompts_are_disjoint():
    prompts = [f"p{i}" for i in range(10)]
    reference, evaluated = split_reference(prompts, None, 0, "test")
    assert not set(reference) & set(evaluated) and len(reference) + len(evaluated) == 10
    with pytest.raises(DataError, match="at least 4"):
        split_reference(prompts[:3], None, 0, "test")


def test_compare_writes_well_formed_files(tiny_pair, tmp_path):
    out = tmp_path / "cmp"
    result = compare(CompareConfig(before=str(tiny_pair / "before"), after=str(tiny_pair / "after"), out=str(out),
                                   safe=str(tiny_pair / "safe.txt"), unsafe=str(tiny_pair / "unsafe.txt"),
                                   layers="1:2", limit=3, progress=False))
    saved = json.loads((out / "mechanistic.json").read_text())
    assert saved["format"] == 1 and saved["safety_layers"] == [1, 2]
    assert saved["sets"]["safe"] == 3 and saved["sets"]["jailbreak"] == 12
    for which in ("before", "after"):
        for scores in saved["tau"][which].values():
            assert len(scores["mean"]) == len(scores["std"]) == 3
    assert len(saved["weights"]["tensors"]) == 21
    report = (out / "report.md").read_text()
    assert "## tau, before" in report and "| layer | matrix |" in report
    assert (out / "tau.png").stat().st_size > 0 and (out / "weights.png").stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["inputs"]["before"]["sha256"]
    assert result["tau"]["after"]["safe"]["mean"] == saved["tau"]["after"]["safe"]["mean"]
