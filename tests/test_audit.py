"""python -m minisafe.audit: a trained model re-checked against its audit.json and the model it started from."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisafe.audit import main as audit_main
from minisafe.training import TrainConfig, train
from tiny import one_thread  # noqa: F401 (an autouse fixture, module-wide)
from train_inputs import write_inputs

ROOT = Path(__file__).resolve().parents[1]
FROZEN = "model.layers.1.mlp.down_proj.weight"
TRAINABLE = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base model, a model trained from it with layer 1 frozen)."""
    root = write_inputs(tmp_path_factory.mktemp("audit"), n_rows=4)
    train(TrainConfig(model=str(root / "model"), data=str(root / "data.jsonl"), out=str(root / "trained"),
                      freeze="1:1", epochs=1, batch_size=2, warmup_steps=1, lr=2e-3, save_every=0, progress=False))
    return root / "model", root / "trained"


def edited_copy(model: Path, out: Path, name: str) -> Path:
    """A copy of `model` with one element of tensor `name` moved to the next float32 up."""
    shutil.copytree(model, out)
    tensors = load_file(str(out / "model.safetensors"))
    flat = tensors[name].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_an_untouched_trained_model_passes_against_its_audit_and_its_base(trained, capsys):
    base, model = trained
    assert audit_main([str(model), "--base", str(base)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_a_one_element_edit_of_a_frozen_tensor_is_caught_naming_the_tensor(trained, tmp_path, capsys):
    base, model = trained
    edited = edited_copy(model, tmp_path / "edited", FROZEN)
    assert audit_main([str(edited), "--base", str(base)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"mismatch: {FROZEN}: sha256 of the weights differs from audit.json's sha256_after" in lines
    assert any(line.startswith(f"mismatch: {FROZEN}: frozen, but not bit-identical to the base model: 1 of ")
               for line in lines)
    assert len(lines) == 2


def test_an_edit_of_a_trainable_tensor_is_caught_by_its_recorded_hash(trained, tmp_path, capsys):
    _, model = trained
    edited = edited_copy(model, tmp_path / "edited", TRAINABLE)
    assert audit_main([str(edited)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"mismatch: {TRAINABLE}: sha256 of the weights differs from audit.json's sha256_after"]


@pytest.mark.parametrize("case, message", [
    ("no-audit", "audit.json not found"),
    ("not-a-model", "config.json"),
    ("bad-audit", "not an audit written by train.py"),
    ("bad-base", "not a model directory"),
])
def test_bad_input_exits_2_with_one_line(trained, tmp_path, capsys, case, message):
    base, model = trained
    target, args = tmp_path / "copy", []
    if case == "not-a-model":
        target.mkdir()
        (target / "audit.json").write_text(json.dumps({"tensors": []}))
    else:
        shutil.copytree(model, target)
    if case == "no-audit":
        (target / "audit.json").unlink()
    if case == "bad-audit":
        (target / "audit.json").write_text(json.dumps({"summary": {}}))
    if case == "bad-base":
        args = ["--base", str(tmp_path / "nowhere")]
    assert audit_main([str(target), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_the_module_runs_from_the_command_line(trained):
    base, model = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "minisafe.audit", str(model), "--base", str(base)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
