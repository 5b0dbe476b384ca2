"""train.py on bad input: every case exits 2 with one line naming the culprit and leaves nothing half-written.

Covered: numeric flags that are not finite or out of range, an output directory that cannot be written, a full disk
at a checkpoint and at the final save (a patched write), a loss that turns non-finite, resuming from each kind of
corrupt checkpoint, and run folders left by a run killed before its first checkpoint.
"""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisafe.checkpoint
import minisafe.run_folder
from minisafe.training import TrainConfig, train
from train import main as train_main
from tiny import one_thread  # noqa: F401 (an autouse fixture, module-wide)
from train_inputs import write_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with a tiny model and 8 sft rows."""
    return write_inputs(tmp_path_factory.mktemp("train_errors"))


def cli_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    """A short run: 2 epochs of 4 steps, a checkpoint after every step; `extra` flags override these."""
    return ["--model", str(inputs / "model"), "--data", str(inputs / "data.jsonl"), "--out", str(out), "--epochs", "2",
            "--batch-size", "2", "--warmup-steps", "1", "--lr", "2e-3", "--save-every", "1", "--no-progress", *extra]


def fails(capsys, args: list[str]) -> str:
    """Run train.py, check that it exits 2 with exactly one line on stderr, and return that line."""
    code = train_main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: "), (code, lines)
    return lines[0]


def half_written(out: Path) -> list[str]:
    """Files an interrupted atomic write leaves behind."""
    return sorted(p.name for p in out.rglob(".*") if p.name.endswith((".partial", ".tmp")) or ".old" in p.name)


def finished_files(out: Path) -> list[str]:
    """Files that would make the folder look like a finished model."""
    return sorted(name for name in ("model.safetensors", "config.json", "audit.json") if (out / name).exists())


# ---------------------------------------------------------------- flags and the output directory


@pytest.mark.parametrize("flag, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1e-4"),
    ("--weight-decay", "nan"), ("--weight-decay", "-0.1"),
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--grad-clip", "-1"),
    ("--beta", "nan"), ("--beta", "-inf"), ("--beta", "0"),
    ("--unlearn-weight", "inf"), ("--unlearn-weight", "-1"),
    ("--val-fraction", "nan"), ("--val-fraction", "1"), ("--val-fraction", "-0.5"),
    ("--epochs", "0"), ("--batch-size", "-2"), ("--max-steps", "0"),
])
def test_a_bad_number_is_refused_naming_the_flag_before_anything_is_written(inputs, tmp_path, capsys, flag, value):
    line = fails(capsys, cli_args(inputs, tmp_path / "out", f"{flag}={value}"))
    assert flag in line
    assert not (tmp_path / "out").exists()


def read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores permission bits: then a sysfs folder)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("case", ["read-only", "under-a-file", "a-file"])
def test_an_output_directory_that_cannot_be_written_is_refused_before_any_work(inputs, tmp_path, capsys, case):
    (tmp_path / "file").write_text("not a directory")
    out = {"read-only": read_only_dir(tmp_path) / "out", "under-a-file": tmp_path / "file" / "out",
           "a-file": tmp_path / "file"}[case]
    line = fails(capsys, cli_args(inputs, out))
    assert f"--out {out}" in line
    assert not out.exists() or out.is_file()
    assert (tmp_path / "file").read_text() == "not a directory"


# ---------------------------------------------------------------- failures during the run


def test_a_full_disk_at_a_checkpoint_stops_the_run_and_keeps_the_previous_checkpoint(inputs, tmp_path, capsys,
                                                                                     monkeypatch):
    out, real, calls = tmp_path / "out", minisafe.run_folder.save_file, []

    def disk_full_on_the_second_checkpoint(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 3:  # a checkpoint writes three files: model, optimizer, rng
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(minisafe.run_folder, "save_file", disk_full_on_the_second_checkpoint)
    line = fails(capsys, cli_args(inputs, out))
    assert "checkpoint of step 2" in line and "No space left on device" in line and "previous checkpoint" in line
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert half_written(out) == [] and finished_files(out) == []
    monkeypatch.undo()
    assert train_main(cli_args(inputs, out, "--resume")) == 0  # the kept checkpoint is usable
    assert finished_files(out) == ["audit.json", "config.json", "model.safetensors"]


def test_a_full_disk_at_the_final_save_leaves_no_model_and_no_audit(inputs, tmp_path, capsys, monkeypatch):
    out, real = tmp_path / "out", minisafe.checkpoint.save

    def disk_full_after_writing(model, tokenizer, path):
        real(model, tokenizer, path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(minisafe.checkpoint, "save", disk_full_after_writing)
    line = fails(capsys, cli_args(inputs, out, "--max-steps", "2"))
    assert "cannot write the trained model" in line and "No space left on device" in line
    assert half_written(out) == [] and finished_files(out) == []
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


def test_a_loss_that_turns_non_finite_stops_the_run_naming_the_step(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    line = fails(capsys, cli_args(inputs, out, "--lr", "1e30", "--warmup-steps", "0"))  # finite, but diverges at once
    assert "step 2:" in line and "not finite" in line and "checkpoint of step 1" in line
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert half_written(out) == [] and finished_files(out) == []
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint" / "model.safetensors")).values())


# ---------------------------------------------------------------- resuming from a corrupt checkpoint


@pytest.fixture(scope="module")
def stopped_run(inputs):
    """A run stopped at --max-steps 1: its checkpoint is what the corruptions below start from."""
    out = inputs / "stopped"
    assert train_main(cli_args(inputs, out, "--max-steps", "1")) == 0
    return out


def drop_a_tensor(file: Path) -> None:
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file))


CORRUPTIONS = {
    "truncated-model": ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:1000]), "truncated or corrupt"),
    "missing-optimizer": ("optimizer.safetensors", Path.unlink, "missing"),
    "missing-tensor": ("model.safetensors", drop_a_tensor, "model.layers.1.mlp.up_proj.weight is missing"),
    "state-not-json": ("state.json", lambda f: f.write_text("{\"step\": 1,"), "not valid JSON"),
    "state-bad-step": ("state.json", lambda f: f.write_text(json.dumps({"format": 1, "step": "one"})), "\"step\""),
    "state-missing": ("state.json", Path.unlink, "no unfinished run"),
    "missing-rng": ("rng.safetensors", Path.unlink, "missing"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_resuming_from_a_corrupt_checkpoint_names_the_file_and_changes_nothing(stopped_run, inputs, tmp_path, capsys,
                                                                              case):
    name, corrupt, message = CORRUPTIONS[case]
    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    corrupt(out / "checkpoint" / name)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = fails(capsys, cli_args(inputs, out, "--max-steps", "1", "--resume"))
    assert str(out / "checkpoint" / name) in line and message in line
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- run folders are never stuck


class Killed(Exception):
    """Stands for a kill: the run stops where it is, without saving."""


def killed_before_the_first_checkpoint(inputs: Path, out: Path) -> None:
    """What a run killed at step 2 leaves (save_every 0): run.json, two log lines and half-written files."""
    cfg = TrainConfig(model=str(inputs / "model"), data=str(inputs / "data.jsonl"), out=str(out), epochs=2,
                      batch_size=2, warmup_steps=1, lr=2e-3, save_every=0, progress=False)

    def kill(step: int) -> None:
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, on_step=kill)
    (out / ".checkpoint.x1y2.partial").mkdir()
    (out / ".checkpoint.x1y2.partial" / "model.safetensors").write_bytes(b"half")
    (out / ".run.json.a1b2.tmp").write_text("{")
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "ep')  # a line cut short


@pytest.mark.parametrize("resume", [False, True], ids=["rerun", "resume"])
def test_a_run_killed_before_its_first_checkpoint_starts_again_from_step_0(inputs, tmp_path, capsys, resume):
    out = tmp_path / "out"
    killed_before_the_first_checkpoint(inputs, out)
    assert train_main(cli_args(inputs, out, "--save-every", "0", *(["--resume"] if resume else []))) == 0
    assert "starting it again from step 0" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert half_written(out) == [] and finished_files(out) == ["audit.json", "config.json", "model.safetensors"]
    assert "resumed" not in json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("intruder", ["notes.txt", "run.json"])
def test_a_folder_with_files_train_py_did_not_write_is_never_cleaned(inputs, tmp_path, capsys, intruder):
    out = tmp_path / "out"
    killed_before_the_first_checkpoint(inputs, out)
    (out / intruder).write_text(json.dumps({"settings": {"mine": True}}))  # not a run.json of train.py
    before = sorted(p.name for p in out.iterdir())
    line = fails(capsys, cli_args(inputs, out))
    assert f"{out} already exists" in line
    assert sorted(p.name for p in out.iterdir()) == before
