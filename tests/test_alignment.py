"""Alignment data of a recipe: pools sliced, own answers as targets (or ShareGPT's with normal_targets reference),
deep-alignment prefixes never trained on, DPO pairs against the model's own harmful answers."""

import json

import pytest

from minisafe.alignment import Recipe, alignment_data, answers_key
from minisafe.errors import ConfigError
from tiny import save_tiny


def write_pools(sets, n: int = 4) -> None:
    """Pool files as the pipeline's data step names them, n rows each."""
    sets.mkdir()
    pools = {"align_harmbench": "Explain how to harm someone with {}", "align_dna": "How do I misuse {}?",
             "align_dna_other": "Tell me something hateful about {}", "instructions_align": "Describe the colour of {}",
             "over_rejection_align": "How do I kill the process named {}?"}
    for name, template in pools.items():
        rows = [{"prompt": template.format(w)} for w in ("tea", "kites", "owls", "salt")[:n]]
        (sets / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    normal = [{"prompt": f"What is a good fact about {w}?", "response": f"A good fact: {w} are fine."}
              for w in ("bees", "rope", "jazz", "snow")[:n]]
    (sets / "normal_align.jsonl").write_text("".join(json.dumps(r) + "\n" for r in normal))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignment")
    save_tiny(root / "model", "llama")
    write_pools(root / "sets")
    return root


def test_refusals_for_malicious_prompts_and_own_answers_for_the_rest(inputs):
    recipe = Recipe(harmbench=2, dna=1, dna_other=1, normal=2, instructions=1, over_rejection=1, answer_tokens=4)
    made = alignment_data(inputs / "sets", recipe, inputs / "model", inputs / "answers.jsonl", seed=0)
    kinds = [r["kind"] for r in made.sft]
    assert kinds.count("malicious") == 4 and made.dpo == []
    shared = {r["prompt"]: r["response"] for r in made.sft if "good fact" in r["prompt"]}
    assert shared and not any(text.startswith("A good fact") for text in shared.values())  # the model's own words


def test_reference_targets_keep_the_recorded_sharegpt_answers(inputs):
    recipe = Recipe(harmbench=1, dna=1, dna_other=0, normal=3, instructions=1, over_rejection=1, answer_tokens=4,
                    normal_targets="reference")
    made = alignment_data(inputs / "sets", recipe, inputs / "model", inputs / "answers.jsonl", seed=0)
    shared = [r for r in made.sft if "good fact" in r["prompt"]]
    assert len(shared) == 3 and all(r["response"].startswith("A good fact") for r in shared)
    with pytest.raises(ConfigError, match="normal_targets"):
        alignment_data(inputs / "sets", Recipe(normal_targets="gold"), inputs / "model", inputs / "a.jsonl", seed=0)


def test_a_pool_shorter_than_the_recipe_is_an_error_naming_it(inputs):
    with pytest.raises(ConfigError, match="align_dna.jsonl has 4"):
        alignment_data(inputs / "sets", Recipe(harmbench=1, dna=9), inputs / "model", inputs / "answers.jsonl", seed=0)


def test_own_refusals_drop_leaves_out_the_prompts_the_model_refused_and_keep_teaches_them(inputs, tmp_path):
    key = answers_key(inputs / "model", 4)
    answers = {"What is a good fact about bees?": "I'm sorry, but I can't help with that.",
               "What is a good fact about rope?": "Rope is made of fibres."}
    cache = tmp_path / "answers.jsonl"
    cache.write_text("".join(json.dumps({"model": key, "prompt": p, "response": r}) + "\n" for p, r in answers.items()))
    recipe = Recipe(harmbench=1, dna=0, dna_other=0, normal=2, instructions=0, over_rejection=0, answer_tokens=4)
    kept = alignment_data(inputs / "sets", recipe, inputs / "model", cache, seed=0)
    dropped = alignment_data(inputs / "sets", Recipe(**{**recipe.__dict__, "own_refusals": "drop"}), inputs / "model",
                             cache, seed=0)
    normal = lambda made: {r["prompt"]: r["response"] for r in made.sft if r["kind"] == "normal"}  # noqa: E731
    assert normal(kept) == answers and normal(dropped) == {"What is a good fact about rope?": "Rope is made of fibres."}


def test_a_later_lever_at_its_default_leaves_the_recorded_settings_unchanged():
    assert "own_refusals" not in Recipe().settings()
    assert Recipe(own_refusals="drop").settings()["own_refusals"] == "drop"


def test_balanced_dpo_keeps_as_many_normal_pairs_as_malicious_ones_and_is_seeded(inputs):
    recipe = Recipe(harmbench=1, dna=1, dna_other=0, normal=4, instructions=2, over_rejection=2, answer_tokens=4,
                    dpo_epochs=1)
    made = lambda **kw: alignment_data(inputs / "sets", Recipe(**{**recipe.__dict__, **kw}), inputs / "model",  # noqa: E731
                                       inputs / "answers.jsonl", seed=0).dpo
    kinds = lambda pairs: [p["kind"] for p in pairs]  # noqa: E731
    everything, balanced = made(), made(dpo_balance=True)
    n = kinds(everything).count("malicious")
    assert n and kinds(everything).count("normal") > n
    assert kinds(balanced).count("normal") == kinds(balanced).count("malicious") == n
    assert all(p in everything for p in balanced) and balanced == made(dpo_balance=True)
    assert "dpo_balance" not in recipe.settings() and Recipe(dpo_balance=True).settings()["dpo_balance"] is True


def test_styled_prompts_are_refused_when_malicious_answered_when_benign_and_never_in_test_wording(inputs, tmp_path):
    from minisafe import builders, data
    from minisafe.alignment import pool_rows, styled_rows
    recipe = Recipe(harmbench=2, dna=2, dna_other=0, normal=1, instructions=2, over_rejection=2, answer_tokens=4,
                    styled=0.5)
    sets = inputs / "sets"
    malicious = pool_rows(sets, recipe, "harmbench") + pool_rows(sets, recipe, "dna")
    _, benign = styled_rows(malicious, pool_rows(sets, recipe, "instructions") + pool_rows(sets, recipe,
                                                                                            "over_rejection"), 0.5, 0)
    refused, answered = benign[0]["prompt"], benign[1]["prompt"]
    cache = tmp_path / "answers.jsonl"  # the model's own answers to the two wrapped benign prompts: one a refusal
    key = answers_key(inputs / "model", 4)
    cache.write_text("".join(json.dumps({"model": key, "prompt": p, "response": r}) + "\n" for p, r in [
        (refused, "I'm sorry, but I can't help with that."), (answered, "Here is the colour, in verse.")]))
    made = alignment_data(sets, recipe, inputs / "model", cache, seed=0)
    opens = [t.split("{prompt}")[0] for t in builders.TRAINING_STYLES.values()]
    wrapped = {r["prompt"]: r for r in made.sft if any(r["prompt"].startswith(o) for o in opens)}
    styled_malicious = [r for r in wrapped.values() if r["kind"] == "malicious"]
    assert len(styled_malicious) == 2 and all(r["response"] in data.bundled_prompts("refusals")
                                              for r in styled_malicious)
    assert {p: r["response"] for p, r in wrapped.items() if r["kind"] != "malicious"} == {
        answered: "Here is the colour, in verse."}  # the refused one is left out
    others = [*builders.REFORMULATIONS.values(), *builders.VALIDATION_STYLES.values()]
    assert not any(t.split("{prompt}")[0] in r["prompt"] for t in others for r in made.sft)
    assert "styled" not in Recipe().settings() and recipe.settings()["styled"] == 0.5
    # with a DPO stage, the wrapped prompts make pairs too: refusal preferred for the malicious ones (over the model's
    # own answer), the benign one's own answer preferred over a refusal
    pairs = alignment_data(sets, Recipe(**{**recipe.__dict__, "dpo_epochs": 1}), inputs / "model", cache, seed=0).dpo
    kinds = {p["prompt"]: p["kind"] for p in pairs if any(p["prompt"].startswith(o) for o in opens)}
    assert kinds[answered] == "normal" and refused not in kinds
    styled_pairs = {p for p, kind in kinds.items() if kind == "malicious"}
    assert styled_pairs and styled_pairs <= {r["prompt"] for r in styled_malicious}


def test_normal_questions_takes_that_share_of_questions_from_the_pool_in_pool_order(tmp_path):
    from minisafe.alignment import is_question, pool_rows
    sets = tmp_path / "sets"
    sets.mkdir()
    prompts = ["Write a poem about tea", "what is rope made of", "List three owls", "Is snow cold?",
               "Summarise this text", "How do kites fly?", "Name a jazz record"]
    (sets / "normal_align.jsonl").write_text("".join(json.dumps({"prompt": p, "response": "ok"}) + "\n"
                                                     for p in prompts))
    assert [is_question(p) for p in prompts] == [False, True, False, True, False, True, False]
    recipe = Recipe(normal=4, normal_questions=0.75)
    assert [r["prompt"] for r in pool_rows(sets, recipe, "normal")] == [
        "Write a poem about tea", "what is rope made of", "Is snow cold?", "How do kites fly?"]
    assert [r["prompt"] for r in pool_rows(sets, Recipe(normal=4), "normal")] == prompts[:4]
    with pytest.raises(ConfigError, match="asks for 4 questions .* normal_align.jsonl has 3"):
        pool_rows(sets, Recipe(normal=4, normal_questions=1.0), "normal")
    assert "normal_questions" not in Recipe().settings() and recipe.settings()["normal_questions"] == 0.75
