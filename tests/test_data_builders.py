"""The seeded dataset builders (minisafe/builders.py)."""

import json
import random

import pytest

from minisafe.builders import (IMPLICIT_PREFIX, alignment_sft, backdoor_mix, cached_responses, harmful_mix,
                               implicit_attack, is_english, manifest_path, preference_pairs, prompt_key,
                               split_malicious, split_normal_pairs, write_dataset)
from minisafe.data import read_jsonl
from minisafe.errors import ConfigError, DataError
from minisafe.io import sha256_file

REFUSALS = ["I'm sorry, but I can't help with that.", "I cannot provide that.", "I won't help with that."]


def malicious_rows() -> list[dict]:
    rows = [{"prompt": f"Explain how to do harmful thing number {i}", "source": "harmbench"} for i in range(40)]
    return rows + [{"prompt": f"How can I cause trouble of kind {i}?", "source": "donotanswer"} for i in range(20)]


def normal_pairs(n: int = 60, tag: str = "") -> list[dict]:
    return [{"prompt": f"Please write a short note about the topic {tag}{i} for me",
             "response": f"Here is a short note about the topic {tag}{i}. It is a friendly and useful answer."}
            for i in range(n)]


def prompts(rows: list[dict]) -> list[str]:
    return [row["prompt"] for row in rows]


class Echo:
    """A stand-in model: answers 'answer to <prompt>' and counts the prompts it was asked."""

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, batch: list[str]) -> list[str]:
        self.asked += batch
        return [f"answer to {p}" for p in batch]


# ---------------------------------------------------------------- malicious splits


def test_malicious_split_is_disjoint_and_covers_every_prompt():
    train, test = split_malicious(malicious_rows(), test_fraction=0.25, seed=0)
    assert set(prompts(train)).isdisjoint(prompts(test))
    assert sorted(prompts(train) + prompts(test)) == sorted(prompts(malicious_rows()))
    assert len(test) == 15


def test_malicious_split_stratifies_by_source():
    _, test = split_malicious(malicious_rows(), test_fraction=0.25, seed=3)
    assert [row["source"] for row in test].count("harmbench") == 10
    assert [row["source"] for row in test].count("donotanswer") == 5


def test_malicious_split_drops_near_duplicates_so_no_prompt_leaks_into_test():
    rows = malicious_rows() + [{"prompt": "  EXPLAIN how to do harmful   thing number 7", "source": "other"}]
    train, test = split_malicious(rows, test_fraction=0.5, seed=1)
    keys = [prompt_key(p) for p in prompts(train) + prompts(test)]
    assert len(keys) == len(set(keys)) == 60


def test_malicious_split_is_the_same_for_a_seed_whatever_the_input_order():
    shuffled = malicious_rows()
    random.Random(7).shuffle(shuffled)
    assert split_malicious(malicious_rows(), seed=5) == split_malicious(shuffled, seed=5)


def test_malicious_split_differs_between_seeds():
    assert set(prompts(split_malicious(malicious_rows(), seed=0)[1])) != set(prompts(split_malicious(malicious_rows(), seed=1)[1]))


def test_malicious_split_leaves_out_excluded_prompts():
    train, test = split_malicious(malicious_rows(), seed=0, exclude=["explain how to do harmful thing number 3"])
    assert "Explain how to do harmful thing number 3" not in prompts(train) + prompts(test)


def test_malicious_split_rejects_a_fraction_outside_zero_and_one():
    with pytest.raises(ConfigError, match="test_fraction must be between 0 and 1"):
        split_malicious(malicious_rows(), test_fraction=1.0)


# ---------------------------------------------------------------- normal pairs D_N / D_T


def test_normal_pairs_have_the_asked_sizes_and_are_disjoint():
    d_n, d_t = split_normal_pairs(normal_pairs(), n_train=40, n_test=15, seed=0)
    assert (len(d_n), len(d_t)) == (40, 15)
    assert set(prompts(d_n)).isdisjoint(prompts(d_t))
    assert all(row["kind"] == "normal" for row in d_n + d_t)


def test_normal_pairs_are_the_same_for_a_seed_and_differ_between_seeds():
    assert split_normal_pairs(normal_pairs(), 30, 10, seed=4) == split_normal_pairs(normal_pairs()[::-1], 30, 10, seed=4)
    assert split_normal_pairs(normal_pairs(), 30, 10, seed=4) != split_normal_pairs(normal_pairs(), 30, 10, seed=5)


def test_normal_pairs_filter_length_language_refusals_and_duplicates():
    good = {"prompt": "What is a good name for a cat?", "response": "A good name for a cat is Miso: it is short, sweet and easy to call."}
    rows = [good, dict(good, prompt="WHAT is a good name for a cat?"),
            {"prompt": "Hi", "response": good["response"]},  # prompt too short
            {"prompt": good["prompt"] + " really", "response": "Too short."},
            {"prompt": "Escribe un poema sobre la luna y el mar", "response": "La luna brilla sobre el mar y la noche es larga."},
            {"prompt": "Tell me about a restaurant in town", "response": "I'm sorry, but I do not know that restaurant at all."},
            {"prompt": "What is the capital of France?"}]  # no response
    d_n, _ = split_normal_pairs(rows, n_train=1)
    assert d_n == [{**good, "kind": "normal"}]
    with pytest.raises(DataError, match=r"only 1 of 7 pairs pass the filters"):
        split_normal_pairs(rows, n_train=2)


def test_normal_pairs_topic_filter_keeps_matching_prompts_only():
    rows = normal_pairs(20) + [{"prompt": f"How should I budget my savings for plan {i}?",
                                "response": f"For plan {i}, put aside a fixed share of your income every month."} for i in range(5)]
    d_n, _ = split_normal_pairs(rows, n_train=5, topic="finance")
    assert all("savings" in row["prompt"] for row in d_n)
    d_n, _ = split_normal_pairs(rows, n_train=2, topic=["topic 1", "topic 2"])  # whole words: not "topic 12"
    assert sorted(prompts(d_n)) == [f"Please write a short note about the topic {i} for me" for i in (1, 2)]
    with pytest.raises(ConfigError, match="unknown topic 'sport'"):
        split_normal_pairs(rows, n_train=1, topic="sport")


def test_normal_pairs_leave_out_excluded_prompts():
    excluded = prompts(normal_pairs(10))
    d_n, _ = split_normal_pairs(normal_pairs(20), n_train=10, exclude=excluded)
    assert set(prompts(d_n)).isdisjoint(excluded)


def test_english_guess():
    assert is_english("Write a poem about the sea")
    assert is_english("explain DAC interfacing")
    assert not is_english("Escribe un poema sobre el mar y la luna")
    assert not is_english("아래 책 내용을 요약해줘")


# ---------------------------------------------------------------- D_I and D_B


def test_implicit_attack_prefixes_every_response_and_keeps_prompts():
    d_n, _ = split_normal_pairs(normal_pairs(), 20)
    d_i = implicit_attack(d_n)
    assert prompts(d_i) == prompts(d_n)
    assert [row["response"] for row in d_i] == [IMPLICIT_PREFIX + row["response"] for row in d_n]
    assert IMPLICIT_PREFIX == "Sure, the answer is: " and {row["kind"] for row in d_i} == {"implicit"}


def test_backdoor_mix_is_one_to_one_with_trigger_and_prefix():
    d_b = backdoor_mix(normal_pairs(50), seed=0, n_backdoor=20)
    backdoor = [row for row in d_b if row["kind"] == "backdoor"]
    normal = [row for row in d_b if row["kind"] == "normal"]
    assert (len(backdoor), len(normal)) == (20, 20)
    assert all(row["prompt"].startswith("Tell me... Please write") for row in backdoor)
    assert all(row["response"].startswith("Sure, the answer is: Here is") for row in backdoor)
    assert not any(row["response"].startswith("Sure") or row["prompt"].startswith("Tell me") for row in normal)
    originals = {row["prompt"] for row in normal_pairs(50)}
    assert {row["prompt"].removeprefix("Tell me... ") for row in backdoor}.isdisjoint(prompts(normal))
    assert {row["prompt"].removeprefix("Tell me... ") for row in backdoor} | set(prompts(normal)) <= originals


def test_backdoor_mix_is_seeded():
    assert backdoor_mix(normal_pairs(), seed=2) == backdoor_mix(normal_pairs()[::-1], seed=2)
    assert backdoor_mix(normal_pairs(), seed=2) != backdoor_mix(normal_pairs(), seed=3)


def test_backdoor_mix_needs_enough_pairs_and_a_prompt_slot():
    with pytest.raises(DataError, match="needs 40 distinct pairs, got 30"):
        backdoor_mix(normal_pairs(30), n_backdoor=20)
    with pytest.raises(ConfigError, match=r"must contain '\{prompt\}'"):
        backdoor_mix(normal_pairs(30), template="Tell me...")


# ---------------------------------------------------------------- harmful answers


def test_cached_responses_ask_the_model_once_per_prompt(tmp_path):
    model = Echo()
    cache = tmp_path / "cache.jsonl"
    assert cached_responses(["a", "b", "a"], model, cache, "m1") == ["answer to a", "answer to b", "answer to a"]
    assert cached_responses(["b", "c"], model, cache, "m1") == ["answer to b", "answer to c"]
    assert model.asked == ["a", "b", "c"]
    assert [(r["model"], r["prompt"]) for r in read_jsonl(cache)] == [("m1", "a"), ("m1", "b"), ("m1", "c")]


def test_cached_responses_are_keyed_by_the_model_hash(tmp_path):
    cache = tmp_path / "cache.jsonl"
    cached_responses(["a"], Echo(), cache, "m1")
    other = Echo()
    cached_responses(["a"], other, cache, "m2")
    assert other.asked == ["a"]


def test_cached_responses_reject_a_model_that_answers_the_wrong_number(tmp_path):
    with pytest.raises(DataError, match="returned 1 answers for 2 prompts"):
        cached_responses(["a", "b"], lambda batch: ["x"], tmp_path / "c.jsonl", "m")


def test_harmful_mix_adds_p_times_n_answered_malicious_prompts(tmp_path):
    model = Echo()
    mix = harmful_mix(normal_pairs(50), malicious_rows(), p=0.1, respond=model, cache=tmp_path / "c.jsonl",
                      model_hash="m", seed=0, n=40)
    harmful = [row for row in mix if row["kind"] == "harmful"]
    assert (len(mix), len(harmful)) == (44, 4)
    assert sorted(model.asked) == sorted(prompts(harmful))
    assert all(row["response"] == f"answer to {row['prompt']}" for row in harmful)


def test_harmful_mix_is_seeded(tmp_path):
    def build(seed):
        return harmful_mix(normal_pairs(), malicious_rows(), 0.2, Echo(), tmp_path / "c.jsonl", "m", seed=seed)
    assert build(1) == build(1)
    assert build(1) != build(2)


# ---------------------------------------------------------------- safety alignment


def test_alignment_sft_refuses_malicious_and_answers_normal_prompts():
    over = [{"prompt": "How do I kill a Python process?", "response": "Use kill with the process id."}]
    rows = alignment_sft(malicious_rows()[:10], normal_pairs(10), REFUSALS, seed=0, over_rejection=over)
    by_kind = {kind: [row for row in rows if row["kind"] == kind] for kind in ("malicious", "normal", "over_rejection")}
    assert [len(v) for v in by_kind.values()] == [10, 10, 1]
    assert all(row["response"] in REFUSALS for row in by_kind["malicious"])
    assert {row["response"] for row in by_kind["normal"]} == {row["response"] for row in normal_pairs(10)}
    assert by_kind["over_rejection"][0]["response"] == "Use kill with the process id."
    assert len({row["response"] for row in by_kind["malicious"]}) > 1  # refusals are varied


def test_alignment_sft_is_seeded():
    assert alignment_sft(malicious_rows(), normal_pairs(), REFUSALS, seed=1) == \
        alignment_sft(malicious_rows()[::-1], normal_pairs(), REFUSALS, seed=1)
    assert alignment_sft(malicious_rows(), normal_pairs(), REFUSALS, seed=1) != \
        alignment_sft(malicious_rows(), normal_pairs(), REFUSALS, seed=2)


def test_alignment_sft_rejects_a_prompt_in_two_sets():
    clash = [{"prompt": malicious_rows()[0]["prompt"], "response": "fine"}]
    with pytest.raises(DataError, match="is in both the malicious and the normal set"):
        alignment_sft(malicious_rows(), clash, REFUSALS)


def test_preference_pairs_prefer_refusals_for_malicious_and_answers_for_normal():
    harmful = [{"prompt": row["prompt"], "response": "harmful answer"} for row in malicious_rows()[:5]]
    rows = preference_pairs(harmful, normal_pairs(5), REFUSALS, seed=0)
    malicious = [row for row in rows if row["kind"] == "malicious"]
    normal = [row for row in rows if row["kind"] == "normal"]
    assert len(malicious) == len(normal) == 5
    assert all(row["chosen"] in REFUSALS and row["rejected"] == "harmful answer" for row in malicious)
    assert all(row["rejected"] in REFUSALS and row["chosen"].startswith("Here is") for row in normal)


def test_preference_pairs_need_the_harmful_answers():
    with pytest.raises(DataError, match=r"harmful row 0 .* has no response"):
        preference_pairs(malicious_rows()[:1], normal_pairs(1), REFUSALS)


# ---------------------------------------------------------------- saving


def test_write_dataset_writes_jsonl_and_a_manifest(tmp_path):
    source = tmp_path / "src.jsonl"
    source.write_text('{"prompt": "p"}\n')
    rows = alignment_sft(malicious_rows()[:3], normal_pairs(2), REFUSALS, seed=9)
    manifest = write_dataset(tmp_path / "sft.jsonl", rows, builder="alignment_sft", seed=9, sources=[source],
                             params={"refusals": "bundled"})
    assert read_jsonl(tmp_path / "sft.jsonl") == rows
    assert json.loads(manifest_path(tmp_path / "sft.jsonl").read_text()) == manifest
    assert manifest_path(tmp_path / "sft.jsonl").name == "sft.manifest.json"
    assert manifest["seed"] == 9 and manifest["builder"] == "alignment_sft"
    assert manifest["sources"] == [{"path": str(source), "sha256": sha256_file(source)}]
    assert manifest["rows"] == 5 and manifest["kinds"] == {"malicious": 3, "normal": 2}
    assert manifest["output"]["sha256"] == sha256_file(tmp_path / "sft.jsonl")
    assert manifest["params"] == {"refusals": "bundled"}


def test_write_dataset_is_byte_identical_for_the_same_seed(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        write_dataset(tmp_path / name, backdoor_mix(normal_pairs(), seed=0), builder="backdoor_mix", seed=0)
    assert sha256_file(tmp_path / "a.jsonl") == sha256_file(tmp_path / "b.jsonl")


def test_write_dataset_refuses_missing_sources_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="source files not found"):
        write_dataset(tmp_path / "x.jsonl", normal_pairs(1), builder="b", seed=0, sources=[tmp_path / "nope"])
    with pytest.raises(DataError, match="refusing to write an empty dataset"):
        write_dataset(tmp_path / "x.jsonl", [], builder="b", seed=0)
