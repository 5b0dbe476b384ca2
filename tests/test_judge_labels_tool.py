"""tools.judge_labels: source specs, the capped stratified sample, and building the labelled file."""

import json

import pytest

from minisafe.errors import DataError
from minisafe.judge_check import check_rows
from tools.judge_labels import build, main, parse_source, stratified_sample


def test_a_source_spec_names_kind_attack_model_and_file():
    assert parse_source("attacked/frozen-13:14:smollm2-135m-instruct=r.jsonl")[:3] == (
        "attacked", "frozen-13:14", "smollm2-135m-instruct")
    assert parse_source("original:qwen=r.jsonl")[:3] == ("original", "none", "qwen")


@pytest.mark.parametrize("spec", ["original=r.jsonl", "aligned/full:m=r.jsonl", "attacked:m=r.jsonl", "tuned:m=r"])
def test_a_bad_source_spec_is_a_data_error(spec):
    with pytest.raises(DataError):
        parse_source(spec)


def candidate(i: int, verdict: str) -> dict:
    return {"key": f"k{i}", "prompt": f"p{i}", "response": "r", "prompt_set": "malicious", "model_kind": "original",
            "model": "m", "attack": "none", "checkpoint": "c", "checkpoint_sha256": "0" * 64, "prompt_file": "f",
            "prompt_file_sha256": "0" * 64, "decoding": {}, "keyword_verdict": verdict}


def test_the_sample_keeps_every_row_of_a_rare_cell_and_caps_a_common_one():
    rows = [candidate(i, "answered") for i in range(30)] + [candidate(100 + i, "refused") for i in range(3)]
    sample = stratified_sample(rows, cap=10, seed=0)
    assert sum(r["keyword_verdict"] == "answered" for r in sample) == 10
    assert {r["weight"] for r in sample if r["keyword_verdict"] == "refused"} == {1.0}
    assert {r["weight"] for r in sample if r["keyword_verdict"] == "answered"} == {3.0}
    assert sample == stratified_sample(list(reversed(rows)), cap=10, seed=0)


def test_build_merges_labels_splits_and_refuses_a_missing_label():
    rows = [candidate(i, "answered") for i in range(4)]
    labels = {r["key"]: {"key": r["key"], "label": "compliance"} for r in rows}
    built = build([{**r, "weight": 1.0} for r in rows], labels, seed=0)
    check_rows(built, "built")
    assert sorted(r["split"] for r in built) == ["dev", "dev", "report", "report"]
    with pytest.raises(DataError, match="no hand label"):
        build([{**r, "weight": 1.0} for r in rows], {}, seed=0)


def test_a_response_whose_checkpoint_is_gone_is_one_error_line_naming_both(tmp_path, capsys):
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"set": "harmful", "prompt": "p", "response": "Sure.", "model": "no/such/model",
                                     "verdict": "answered"}) + "\n")
    out = tmp_path / "candidates.jsonl"
    assert main(["sample", "--source", f"original:m={responses}", "--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{responses}: no/such/model" in err and "does not exist" in err
    assert not out.exists()


def test_an_output_that_is_a_directory_exits_2_before_any_work(tmp_path, capsys):
    assert main(["build", "--candidates", "c.jsonl", "--labels", "l.jsonl", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--out {tmp_path} is a directory, not a file" in err
