"""Hooks, the cosine analysis, the range rule and the scaling search, on tiny models and constructed curves."""

import numpy as np
import pytest
import torch

import minisafe
from minisafe.errors import ConfigError
from minisafe.hooks import record_layers, scaled_layers, scaled_parameters
from minisafe.locating import cosine_analysis, initial_range, last_token_vectors, search_bounds, choose_alpha
from tiny import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny(path, "qwen2")
    return minisafe.load(path)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_scaling_multiplies_exactly_the_projection_weights_of_the_range(tiny):
    model, _ = tiny
    before = snapshot(model)
    with scaled_layers(model, 1, 2, 1.25) as names:
        after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(names)
    assert {n.split(".")[2] for n in names} == {"1", "2"}
    assert {n.split(".")[-2] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(n.endswith(".weight") for n in names)  # biases and norms are not scaled
    for n in names:
        assert torch.equal(after[n], before[n] * 1.25)


def test_scaling_restores_every_tensor_bit_for_bit(tiny):
    model, _ = tiny
    before = snapshot(model)
    with scaled_layers(model, 0, 2, 1.1):
        pass
    assert all(torch.equal(before[n], t) for n, t in snapshot(model).items())


def test_scaling_restores_weights_when_an_exception_escapes(tiny):
    model, _ = tiny
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with scaled_layers(model, 0, 1, 0.8):
            raise RuntimeError("boom")
    assert all(torch.equal(before[n], t) for n, t in snapshot(model).items())


def test_scaling_with_alpha_one_changes_no_logit(tiny):
    model, _ = tiny
    ids = torch.randint(5, 250, (2, 9))
    with torch.no_grad():
        plain = model(ids)
        with scaled_layers(model, 0, 2, 1.0):
            scaled = model(ids)
    assert torch.equal(plain, scaled)


def test_o_proj_can_be_left_unscaled_and_phi3_fused_matrices_are_scaled(tmp_path):
    save_tiny(tmp_path, "phi3")
    model, _ = minisafe.load(tmp_path)
    names = [n for n, _ in scaled_parameters(model, 0, 0, scale_o_proj=False)]
    assert sorted(n.split(".")[-2] for n in names) == ["down_proj", "gate_up_proj", "qkv_proj"]


def test_scaling_a_range_outside_the_model_is_a_clear_error(tiny):
    model, _ = tiny
    message = r"layer range 2:3: layer 3 is outside this 3-layer model \(layers 0\.\.2, both inclusive\)"
    with pytest.raises(ConfigError, match=message):
        with scaled_layers(model, 2, 3, 1.2):
            pass


def test_vector_reader_returns_the_models_own_layer_outputs(tiny):
    model, tok = tiny
    prompts = ["Give me a recipe.", "Write a poem about the sea, please, in five lines.", "Hi"]
    vectors = last_token_vectors(model, tok, prompts, "chat", batch_size=2, progress=False)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([tok.prompt_ids(prompt, "chat")])
        with torch.no_grad():
            _, hidden = model(ids, return_hidden=True)
        expected = torch.stack([h[0, -1] for h in hidden])
        assert torch.allclose(vectors[row], expected, atol=1e-5)


def test_record_layers_reads_chosen_layers_at_chosen_positions_and_removes_its_hooks(tiny):
    model, _ = tiny
    ids = torch.randint(5, 250, (2, 7))
    with torch.no_grad(), record_layers(model, layers=[1], positions=[0, 3]) as records:
        _, hidden = model(ids, return_hidden=True)
    assert list(records) == [1] and records[1][0].shape == (2, 2, 64)
    assert torch.equal(records[1][0], hidden[1][:, [0, 3]])
    assert all(not layer._forward_hooks for layer in model.layers)


def test_cosine_analysis_of_identical_directions_has_no_gap_and_opposite_sets_a_large_one():
    torch.manual_seed(0)
    base = torch.randn(1, 4, 16)
    normal = base + 0.01 * torch.randn(20, 4, 16)
    malicious = base + 0.01 * torch.randn(20, 4, 16)
    same = cosine_analysis(normal, malicious, pairs=200)
    assert max(abs(g) for g in same["gap"]) < 1.0
    malicious[:, 2:] = -malicious[:, 2:]  # layers 2 and 3: malicious points the other way
    split = cosine_analysis(normal, malicious, pairs=200)
    assert split["gap"][3] > 170 and abs(split["gap"][0]) < 1.0
    assert split["N-M"]["mean"][3] == pytest.approx(-1, abs=0.01) and split["M-M"]["mean"][3] > 0.99


def test_cosine_pairs_are_seeded():
    x, y = torch.randn(10, 3, 8), torch.randn(10, 3, 8)
    assert cosine_analysis(x, y, seed=3) == cosine_analysis(x, y, seed=3)
    assert cosine_analysis(x, y, seed=3) != cosine_analysis(x, y, seed=4)


def planted_gap(first, last, layers=30, height=30.0, noise=0.2, seed=0):
    """Flat near zero, a linear rise across first..last, then flat at `height`, with small noise."""
    rng = np.random.default_rng(seed)
    g = np.clip((np.arange(layers) - first + 1) / (last - first + 1), 0, 1) * height
    return (g + rng.normal(0, noise, layers)).tolist()


@pytest.mark.parametrize("first,last", [(6, 11), (10, 17), (3, 5)])
def test_range_rule_finds_a_planted_rise(first, last):
    assert initial_range(planted_gap(first, last)) == (first, last)


def test_range_rule_stops_at_the_peak_of_a_rise_that_falls_again():
    g = [6, 7, 6.5, 7, 8, 12, 17, 21, 23.5, 22, 18, 12, 9, 8]
    assert initial_range(g) == (4, 8)


def test_range_rule_says_no_gap_for_a_flat_curve():
    assert initial_range([0.3, 0.5, 0.4, 0.9, 1.2, 0.8, 1.1]) is None


def fake_counter(best_first, best_last, sign=1):
    """Refusals peak (sign=1) or dip (sign=-1) at a known range, falling off with the distance to it."""
    calls = []

    def count(first, last):
        calls.append((first, last))
        return 200 + sign * (50 - 7 * abs(first - best_first) - 5 * abs(last - best_last))
    return count, calls


@pytest.mark.parametrize("alpha,sign", [(1.2, 1), (0.8, -1)])
def test_search_finds_the_known_optimum_and_counts_each_range_once(alpha, sign):
    count, calls = fake_counter(5, 13, sign)
    result = search_bounds(count, (6, 12), num_layers=30, alpha=alpha, sweep=2)
    assert (result.first, result.last) == (5, 13)
    assert len(calls) == len(set(calls)) == 9  # 5 upper + 5 lower candidates, one of them shared
    assert [t["last"] for t in result.trace if t["phase"] == "upper"] == [10, 11, 12, 13, 14]
    assert [t["first"] for t in result.trace if t["phase"] == "lower"] == [4, 5, 6, 7, 8]


def test_search_keeps_bounds_inside_the_model():
    count, calls = fake_counter(0, 5)
    result = search_bounds(count, (1, 5), num_layers=6, alpha=1.2, sweep=2)
    assert (result.first, result.last) == (0, 5)
    assert all(0 <= f <= l < 6 for f, l in calls)


def test_automatic_alpha_steps_until_refusals_move_clearly():
    moved = {1.05: 101, 1.1: 104, 1.15: 130}
    alpha, trace = choose_alpha(lambda a: moved.get(round(a, 2), 300), baseline=100, n_prompts=500)
    assert alpha == 1.15 and [t["alpha"] for t in trace] == [1.05, 1.1, 1.15]
    alpha, trace = choose_alpha(lambda a: 100 + int(a * 10 % 3), baseline=100, n_prompts=500)
    assert len(trace) == 6 and alpha == max(trace, key=lambda t: t["moved"])["alpha"]


def test_automatic_alpha_ignores_refusals_moving_against_the_scaling():
    # Scaling up that removes refusals is not the effect the search looks for; nor is scaling down that adds them.
    up = {1.05: 80, 1.1: 75, 1.15: 112}
    alpha, trace = choose_alpha(lambda a: up[round(a, 2)], baseline=100, n_prompts=200)
    assert alpha == 1.15 and [t["moved"] for t in trace] == [-20, -25, 12]
    down = {0.95: 130, 0.9: 90}
    alpha, _ = choose_alpha(lambda a: down[round(a, 2)], baseline=100, n_prompts=200, upward=False)
    assert alpha == 0.9


def test_range_rule_ignores_early_bumps_and_starts_where_the_gap_appears_for_good():
    g = [4.7, 5.2, 3.6, 3.2, 5.4, 5.9, 5.2, 5.6, 5.3, 6.5, 6.5, 6.5, 5.9, 5.7, 3.6, 3.4, 3.8, 4.3, 5.2, 5.5, 6.6,
         7.7, 8.8, 8.3, 8.1]
    assert initial_range(g) == (16, 22)
