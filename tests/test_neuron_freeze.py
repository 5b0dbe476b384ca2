"""Neuron-level freezing (the paper's NFFT control): random rows of the projections stay bit-identical, the rest
trains, the count matches the layer spec it imitates, and the audit catches a changed frozen row."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisafe.audit import build_audit, recheck, verify_audit
from minisafe.checkpoint import load
from minisafe.errors import ConfigError
from minisafe.freeze import frozen_by_layers, neuron_count, random_neurons
from minisafe.training import TrainConfig, train
from tiny import one_thread, save_tiny  # noqa: F401 (one_thread: an autouse fixture)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nfft")
    save_tiny(root / "llama", "llama")
    save_tiny(root / "qwen2", "qwen2")  # q, k and v have biases: a frozen row freezes its bias entry too
    rows = [{"prompt": f"tell me about item {i}", "response": f"item {i} is a fine thing to know"} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def nfft_run(root: Path, family: str, out: str, **kw) -> tuple[TrainConfig, dict]:
    cfg = TrainConfig(model=str(root / family), data=str(root / "data.jsonl"), out=str(root / out), epochs=2,
                      batch_size=4, warmup_steps=1, lr=5e-3, weight_decay=0.1, progress=False, save_every=0,
                      freeze_random_neurons="like:1:1", seed=3, **kw)
    return cfg, train(cfg)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_frozen_rows_are_bit_identical_and_every_other_row_of_those_tensors_moves(model_dirs, family):
    cfg, _ = nfft_run(model_dirs, family, f"nfft-{family}")
    before = load_file(str(model_dirs / family / "model.safetensors"))
    after = load_file(str(Path(cfg.out) / "model.safetensors"))
    audit = json.loads((Path(cfg.out) / "audit.json").read_text())
    with_rows = [r for r in audit["tensors"] if "frozen_rows" in r]
    assert with_rows and audit["summary"]["frozen_rows_changed"] == 0
    for r in with_rows:
        name, rows = r["name"], torch.tensor(r["frozen_rows"])
        assert torch.equal(after[name][rows], before[name][rows]), name
        free = torch.ones(before[name].shape[0], dtype=torch.bool)
        free[rows] = False
        changed = (after[name][free] != before[name][free]).reshape(int(free.sum()), -1).any(-1)
        assert changed.all(), f"{name}: a row that is not frozen did not train"


def test_nfft_freezes_as_many_parameters_as_the_layer_spec_within_one_row(model_dirs):
    model, _ = load(model_dirs / "llama")
    target = frozen_by_layers(model, "1:1")
    neurons = random_neurons(model, neuron_count(model, "like:1:1"), seed=0)
    params = dict(model.named_parameters())
    frozen = sum(len(rows) * params[name].shape[1] for name, rows in neurons.items())
    widest_row = max(p.shape[1] for n, p in params.items() if n in neurons)
    assert target <= frozen < target + widest_row


def test_the_draw_depends_on_the_seed_and_only_on_the_seed(model_dirs):
    model, _ = load(model_dirs / "llama")
    assert random_neurons(model, 500, seed=1) == random_neurons(model, 500, seed=1)
    assert random_neurons(model, 500, seed=1) != random_neurons(model, 500, seed=2)


def test_rows_are_drawn_only_from_tensors_left_trainable_by_the_other_flags(model_dirs):
    cfg, _ = nfft_run(model_dirs, "llama", "nfft-with-layers", freeze="1:1")
    audit = json.loads((Path(cfg.out) / "audit.json").read_text())
    assert all(r["trainable"] for r in audit["tensors"] if "frozen_rows" in r)
    assert not any(".layers.1." in r["name"] for r in audit["tensors"] if "frozen_rows" in r)
    assert audit["summary"]["frozen_changed"] == 0


def test_the_audit_fails_on_a_single_changed_bit_of_a_frozen_row():
    before = {"w": torch.arange(12, dtype=torch.float32).reshape(4, 3)}
    after = {"w": before["w"] + 1}
    after["w"][2] = before["w"][2]
    verify_audit(build_audit(before, after, {"w"}, {"w": [2]}))  # row 2 untouched: passes
    after["w"][2, 1] = torch.nextafter(after["w"][2, 1], torch.tensor(100.0))
    with pytest.raises(RuntimeError, match=r"w \(frozen rows\)"):
        verify_audit(build_audit(before, after, {"w"}, {"w": [2]}))


def test_the_recheck_command_catches_an_edit_of_a_frozen_row_after_training(model_dirs):
    cfg, _ = nfft_run(model_dirs, "llama", "nfft-edited")
    out = Path(cfg.out)
    assert recheck(out, model_dirs / "llama") == []
    audit = json.loads((out / "audit.json").read_text())
    row = next(r for r in audit["tensors"] if "frozen_rows" in r)
    tensors = load_file(str(out / "model.safetensors"))
    tensors[row["name"]][row["frozen_rows"][0], 0] += 1.0
    save_file(tensors, str(out / "model.safetensors"))
    problems = recheck(out, model_dirs / "llama")
    assert any(row["name"] in p and "frozen rows" in p for p in problems)


def test_bad_neuron_counts_are_refused_naming_the_flag(model_dirs):
    model, _ = load(model_dirs / "llama")
    for bad in ("0", "-5", "lots", "like:9:9"):
        with pytest.raises(ConfigError, match="freeze-random-neurons|layer 9"):
            random_neurons(model, neuron_count(model, bad), seed=0)
    with pytest.raises(ConfigError, match="hold only"):
        random_neurons(model, 10**9, seed=0)
