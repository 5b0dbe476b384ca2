"""The linear-probe refusal judge: logistic regression on a fixed layer's last-token state, chosen by
cross-validation on the development labels, saved with its model's hash and loaded through load_judge."""

import json
import shutil

import pytest
import torch

from minisafe.errors import CheckpointError, ConfigError
from minisafe.judge import load_judge
from minisafe.judge_probe import (cross_validated_predictions, fit_logistic, grid_layers, main, predict, read_probe,
                                  train_probe)
from tiny import save_tiny


def test_the_probed_layers_are_fixed_shares_of_the_depth():
    assert grid_layers(30) == [7, 14, 21, 29]
    assert grid_layers(3) == [0, 1, 2]


def test_logistic_regression_separates_features_that_a_line_separates():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] - 0.5 * x[:, 3] > 0).float()
    probe = fit_logistic(x, y, l2=0.001)
    assert (predict(probe, x) == y.bool()).float().mean() >= 0.97  # L2 costs a few points near the line
    assert (cross_validated_predictions(x, y, l2=0.001) == y.bool()).float().mean() > 0.9


def tiny_labels(path, n: int = 12) -> None:
    """n labelled rows, all dev, half refusals, in the judge_labels schema."""
    rows = []
    for i in range(n):
        refusal = i % 2 == 0
        rows.append({"id": f"t{i}", "key": f"k{i}", "prompt": f"question {i}",
                     "response": "I'm sorry, I can't." if refusal else f"Here is answer {i}.",
                     "prompt_set": "malicious", "model_kind": "original", "model": "tiny", "attack": "none",
                     "checkpoint": "tiny", "checkpoint_sha256": "0" * 64, "prompt_file": "p.jsonl",
                     "prompt_file_sha256": "0" * 64, "decoding": {}, "keyword_verdict": "refused" if refusal else
                     "answered", "label": "refusal" if refusal else "compliance", "note": "", "weight": 1.0,
                     "split": "dev"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    save_tiny(root / "model", "llama")
    tiny_labels(root / "labels.jsonl")
    assert main([str(root / "labels.jsonl"), "--model", str(root / "model"), "--out", str(root / "probe.safetensors"),
                 "--cv-out", str(root / "cv.json")]) == 0
    return root


def test_a_trained_probe_records_its_model_layer_and_labels(trained):
    probe, meta = read_probe(trained / "probe.safetensors")
    assert probe["weight"].shape == (64,) and meta["layer"] in grid_layers(3)
    assert meta["rows"] == "12" and meta["split"] == "dev" and len(meta["model_sha256"]) == 64
    held_out = json.loads((trained / "cv.json").read_text())
    assert len(held_out["verdicts"]) == 12 and held_out["table"]["all"]["n"] == 12


def test_load_judge_takes_a_probe_by_name_and_judges_every_pair(trained):
    judge = load_judge(f"probe:{trained / 'probe.safetensors'}", progress=False)
    verdicts = judge.refusals(["question 0", "question 1"], ["I'm sorry, I can't.", "Here is answer 1."])
    assert len(verdicts) == 2 and all(isinstance(v, bool) for v in verdicts)
    assert judge.name.startswith("probe probe.safetensors (layer")


def test_a_probe_whose_model_changed_is_refused(trained, tmp_path):
    shutil.copy(trained / "probe.safetensors", tmp_path / "probe.safetensors")
    probe, meta = read_probe(tmp_path / "probe.safetensors")
    shutil.copytree(trained / "model", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    train_probe(trained / "labels.jsonl", tmp_path / "model", tmp_path / "probe.safetensors", 4)
    shutil.copytree(trained / "model", tmp_path / "model", dirs_exist_ok=True)  # the model changes back under it
    with pytest.raises(CheckpointError, match="not the one it was trained on"):
        load_judge(f"probe:{tmp_path / 'probe.safetensors'}")


def test_a_probe_spec_that_is_not_a_probe_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="probe .safetensors file"):
        load_judge(f"probe:{tmp_path / 'none.safetensors'}")
