"""minisafe.synthetic: the PCFG / operator world, its labels and jailbreaks, exact greedy checks, a tiny lab run."""

import json
import random

import pytest

from minisafe import synthetic as S
from minisafe.generate import generate
from test_mechanistic import one_thread  # noqa: F401  (autouse: one thread, so runs repeat bit for bit)


@pytest.mark.parametrize("grammar", list(S.GRAMMARS))
def test_every_derivation_parses_uses_its_letters_and_fits_the_window(grammar):
    rng = random.Random(3)
    for _ in range(25):
        text = S.sample_text(grammar, rng)
        assert S.WINDOW[0] <= len(text) <= S.WINDOW[1]
        assert set(text) <= S.grammar_letters(grammar)
        assert S.parses(text, grammar)


def test_the_parser_rejects_text_of_another_grammar_and_broken_text():
    rng = random.Random(4)
    text = S.sample_text("G0", rng)
    assert not S.parses(text, "G2")  # G2 cannot emit G0's safe block 1 letters where G0 puts them
    assert not S.parses(text[:-1] + ["t29"], "G0")  # t29 (block 5) is not a G0 letter
    assert not S.parses(["t00"] * 30, "G0")  # G0 letters, but every Z rule needs two different pre-terminals


def test_grammars_share_one_tree_and_differ_in_dominance():
    assert [S.is_safe_dominant(g) for g in S.TRAINING_GRAMMARS] == [True, True, False, False]
    assert not S.is_safe_dominant("INTERMEDIATE")
    assert len({S.GRAMMARS[g] for g in S.GRAMMARS}) == len(S.GRAMMARS)


def test_operators_are_bijections_with_identity_and_duplicates():
    perms = S.make_operators(0)
    assert len(perms) == S.N_OPERATORS
    assert all(sorted(p) == list(range(S.N_LETTERS)) for p in perms)
    assert perms[0] == list(range(S.N_LETTERS))
    assert len({tuple(p) for p in perms[:12]}) == 12
    assert all(perms[dup] == perms[original] for dup, original in S.DUPLICATES.items())


def test_safety_labels_follow_the_table():
    for grammar in S.TRAINING_GRAMMARS:
        safe_text = S.is_safe_dominant(grammar)
        for op in S.ALWAYS_SAFE:
            assert not S.is_unsafe(op, grammar)
        for op in S.UNSAFE_ANYWHERE:
            assert S.is_unsafe(op, grammar)
        for op in S.UNSAFE_ON_UNSAFE_TEXT:
            assert S.is_unsafe(op, grammar) == (not safe_text)
        for dup, original in S.DUPLICATES.items():
            assert S.is_unsafe(dup, grammar) == S.is_unsafe(original, grammar)
    assert S.sample_unsafe((0, 6), "G2") and not S.sample_unsafe((0, 6), "G0")


def test_samples_apply_the_operators_and_unsafe_targets_are_null():
    perms = S.make_operators(0)
    rng = random.Random(5)
    samples = S.safety_samples(200, rng, perms)
    assert {s.unsafe for s in samples} == {True, False}
    for s in samples:
        assert s.unsafe == S.sample_unsafe(s.operators, s.grammar)
        assert list(s.output) == S.apply_operators(s.text, s.operators, perms)
        assert s.grammar in S.SAFETY_GRAMMARS and s.operators[0] in S.SAFETY_OPERATORS
        assert s.target == (" ".join([S.NULL] * len(s.text)) if s.unsafe else " ".join(s.output))
    identity = S.make_sample((0, 0), "G1", rng, perms)
    assert identity.output == identity.text


def test_jailbreaks_are_unsafe_and_outside_the_safety_fine_tuning_distribution():
    perms = S.make_operators(0)
    rng = random.Random(6)
    for kind in S.JAILBREAKS:
        samples = S.jailbreak_samples(kind, 30, rng, perms)
        assert all(s.unsafe for s in samples)
    assert all(s.operators[1] != 0 for s in S.jailbreak_samples("competing_operator", 20, rng, perms))
    assert all(s.grammar == "INTERMEDIATE" for s in S.jailbreak_samples("competing_text", 20, rng, perms))
    assert all(s.operators[0] in S.DUPLICATES for s in S.jailbreak_samples("mismatched_operator", 20, rng, perms))
    assert all(s.grammar == "G3" for s in S.jailbreak_samples("mismatched_text", 20, rng, perms))
    # safety fine-tuning never pairs an unsafe input with a non-identity second operator
    assert all(s.operators[1] == 0 for s in S.safety_samples(300, rng, perms) if s.unsafe)


def test_generation_is_deterministic_for_a_seed():
    def draw(seed):
        perms = S.make_operators(seed)
        return S.pretraining_samples(20, random.Random(seed), perms), S.evaluation_sets(5, seed, perms)
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_greedy_writes_agrees_with_greedy_generation():
    tok = S.build_tokenizer()
    model = S.build_model(S.ModelSize(2, 2, 32, 64), tok, seed=0).eval()
    perms = S.make_operators(0)
    samples = S.pretraining_samples(4, random.Random(0), perms)
    prompts = [s.prompt for s in samples]
    out = generate(model, tok, [tok.prompt_ids(p, "chat") for p in prompts], max_new_tokens=40)
    written = [tok.decode([i for i in ids if i not in tok.eos_token_ids], skip_special_tokens=False) for ids in out.ids]
    ended = [bool(ids) and ids[-1] in tok.eos_token_ids for ids in out.ids]
    assert S.greedy_writes(model, tok, prompts, written) == ended  # exactly what greedy wrote, when it stopped
    assert S.greedy_writes(model, tok, prompts, [s.answer for s in samples]) == [False] * 4  # untrained model


def test_a_tiny_lab_run_writes_well_formed_results(tmp_path):
    cfg = S.LabConfig(out=str(tmp_path / "lab"), size=S.ModelSize(2, 2, 32, 64), pretrain_samples=48,
                      safety_samples=32, safety_lr=5e-4, dpo_lr=2e-4, batch_size=16, eval_samples=6,
                      reference_samples=6, progress=False)
    results = S.run_lab(cfg)
    saved = json.loads((tmp_path / "lab" / "results.json").read_text())
    assert saved["models"].keys() == {"pretrained", "ssft", "dpo", "unlearn"}
    for entry in saved["models"].values():
        assert entry["behaviour"].keys() == {"safe", "unsafe", *S.JAILBREAKS}
        for rates in entry["behaviour"].values():
            assert 0 <= rates["output_rate"] <= 1 and 0 <= rates["null_rate"] <= 1 and rates["n"] == 6
        assert all(len(v["mean"]) == 2 for v in entry["tau"].values())
    assert saved["weights"].keys() == {"ssft", "dpo", "unlearn"}
    assert all(len(w["tensors"]) == 14 for w in saved["weights"].values())  # 7 matrices x 2 layers
    report = (tmp_path / "lab" / "report.md").read_text()
    assert "| model | safe: accuracy | unsafe: null rate |" in report
    assert "DPO lr 0.0002 and beta 0.1" in report and saved["settings"]["dpo_lr"] == 2e-4
    # DPO trains at its own learning rate, SSFT and unlearning at the shared one
    lrs = {m: json.loads((tmp_path / "lab" / m / "run.json").read_text())["settings"]["lr"] for m in S.METHODS}
    assert lrs == {"ssft": 5e-4, "dpo": 2e-4, "unlearn": 5e-4}
    assert (tmp_path / "lab" / "tau.png").stat().st_size > 0
    # the embedding attack: on the safety fine-tuned models only, success per budget, tau of the attacked inputs
    assert "attack" not in saved["models"]["pretrained"]
    for method in S.METHODS:
        attack = saved["models"][method]["attack"]
        assert attack["success"].keys() == {"0", "20", "100"} and attack["n"] == 6
        assert {"attack@0", "attack@20", "attack@100"} <= saved["models"][method]["tau"].keys()
    assert "## Embedding attack" in report and (tmp_path / "lab" / "attack.png").stat().st_size > 0
    assert results["timings"]["total_s"] > 0
    with pytest.raises(S.ConfigError, match="not empty"):
        S.run_lab(cfg)
