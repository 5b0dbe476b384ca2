"""The folder of a training run: its checkpoint (written atomically, read back only after every file is checked), its
log, and what a killed run left behind.

A run folder (--out of train.py) holds run.json, train_log.jsonl, while the run is unfinished checkpoint/
(model.safetensors, optimizer.safetensors, rng.safetensors, reference.safetensors for dpo, state.json) and, once it
has finished or stopped at --max-steps, the model files and audit.json. Kinds of folder (output_kind):
  empty       absent or empty: a new run starts there;
  unfinished  holds a checkpoint: --resume continues it;
  stuck       holds nothing but a run.json of train.py, its train_log.jsonl and partial files: a run killed before
              its first checkpoint, which is started again from step 0 (its run.json and log are removed);
  taken       anything else (a finished run, or files train.py did not write): never cleaned.
Partial files are what an atomic write (minisafe.io) leaves when killed: .NAME.XXXX.tmp files, .NAME.XXXX.partial
directories, and .checkpoint.oldPID (the previous checkpoint, put back if the kill came between the two renames).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from minisafe.errors import CheckpointError, ConfigError, TrainingError
from minisafe.io import atomic_directory, atomic_write_text, read_json

CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------- what a run leaves in its folder


def is_partial(path: Path) -> bool:
    """A file or directory that an atomic write into the run folder left behind when the run was killed."""
    name = path.name
    return name.startswith(".") and (name.endswith((".partial", ".tmp")) or name.startswith(".checkpoint.old"))


def has_checkpoint(out: Path) -> bool:
    """Whether out holds a training checkpoint (or one a kill caught while it was being replaced)."""
    return any((path / "state.json").is_file() for path in (out / "checkpoint", *out.glob(".checkpoint.old*")))


def written_by_train(path: Path) -> bool:
    """Whether path is a run.json that this module wrote (its settings are TrainConfig's)."""
    try:
        record = read_json(path, ConfigError)
    except (ConfigError, OSError):
        return False
    settings = record.get("settings") if isinstance(record, dict) else None
    return isinstance(settings, dict) and {"model", "data", "objective", "freeze_scope"} <= set(settings)


def output_kind(out: Path) -> str:
    """'empty' (absent or empty), 'unfinished' (holds a checkpoint), 'stuck' (a run that stopped before its first
    checkpoint: nothing but its run.json, train_log.jsonl and partial files) or 'taken' (anything else)."""
    if not out.is_dir() or not any(out.iterdir()):
        return "empty"
    if has_checkpoint(out):
        return "unfinished"
    names = {path.name for path in out.iterdir() if not is_partial(path)}
    if not names or (names <= {"run.json", "train_log.jsonl"} and written_by_train(out / "run.json")):
        return "stuck"
    return "taken"


def clean_output_dir(out: Path, restart: bool) -> None:
    """Remove what a killed run left half-written in out (with restart, its run.json and log too); put back a
    checkpoint that a kill caught between the two renames of its replacement."""
    olds = sorted(out.glob(".checkpoint.old*"))
    if olds and not (out / "checkpoint").exists():
        os.replace(olds.pop(), out / "checkpoint")
    for path in [*olds, *(p for p in out.iterdir() if is_partial(p) and p not in olds)]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in ("run.json", "train_log.jsonl") if restart else ():
        (out / name).unlink(missing_ok=True)

# ---------------------------------------------------------------- writing a checkpoint


def save_checkpoint(path: Path, model_state: dict[str, Tensor], optimizer_state: dict[str, Tensor],
                    references: dict[str, Tensor], position: dict) -> None:
    """Write checkpoint/ atomically: weights, AdamW state, RNG states, dpo reference log-probs, position. A failed
    write (disk full, I/O error) is a TrainingError that leaves the previous checkpoint as it was."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    try:
        with atomic_directory(path) as tmp:
            save_file({n: t.contiguous() for n, t in model_state.items()}, str(tmp / "model.safetensors"))
            save_file({n: t.contiguous() for n, t in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))
            save_file(rng, str(tmp / "rng.safetensors"))
            if references:
                save_file(references, str(tmp / "reference.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, **position}, indent=2) + "\n")
    except OSError as e:
        kept = "the previous checkpoint is kept" if (path / "state.json").is_file() else "there is no earlier one"
        raise TrainingError(f"{path}: cannot write the checkpoint of step {position['step']} ({e.strerror or e}); "
                            f"{kept}") from None


def checkpoint_position(step: int, steps_per_epoch: int, total_steps: int, schedule: str, warmup_steps: int) -> dict:
    """state.json's position: the data position is the step (epoch = step // steps_per_epoch), the LR a function
    of it; the schedule is recorded so that a reader can tell."""
    return {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
            "total_steps": total_steps, "schedule": schedule, "warmup_steps": warmup_steps}

# ---------------------------------------------------------------- reading a checkpoint back


def read_checkpoint(path: Path, total_steps: int, model_shapes: dict[str, tuple[int, ...]],
                    trainable_shapes: dict[str, tuple[int, ...]], reference_shapes: dict[str, tuple[int, ...]]
                    ) -> dict:
    """Every file of a training checkpoint, checked against this run before anything is restored from it."""
    adam_shapes = {f"{name}:{part}": shape for name, full in trainable_shapes.items()
                   for part, shape in (("step", ()), ("exp_avg", full), ("exp_avg_sq", full))}
    saved = {"position": read_position(path / "state.json", total_steps)}
    for part, shapes in (("model", model_shapes), ("optimizer", adam_shapes), ("reference", reference_shapes)):
        if shapes:
            saved[part] = read_tensors(path / f"{part}.safetensors")
            check_shapes(path / f"{part}.safetensors", saved[part], shapes)
    saved["rng"] = read_tensors(path / "rng.safetensors")
    if "torch" not in saved["rng"] or saved["rng"]["torch"].dtype != torch.uint8:
        raise CheckpointError(f"{path / 'rng.safetensors'}: tensor torch (the CPU random-number state) is missing")
    return saved


def read_position(file: Path, total_steps: int) -> dict:
    """A checkpoint's state.json: its format and a step within this run's schedule."""
    position = read_json(file, CheckpointError)
    if position is None:
        raise CheckpointError(f"{file}: missing, so the checkpoint in {file.parent} cannot be resumed")
    step = position.get("step") if isinstance(position, dict) else None
    if (not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total_steps
            or position.get("format") != CHECKPOINT_FORMAT):
        raise CheckpointError(f"{file}: expected \"format\": {CHECKPOINT_FORMAT} and a \"step\" in 0..{total_steps}")
    return position


def read_tensors(file: Path) -> dict[str, Tensor]:
    """Every tensor of one file of a checkpoint; a CheckpointError names the file if it is missing or unreadable."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing, so the checkpoint in {file.parent} cannot be resumed")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def check_shapes(file: Path, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """The file holds exactly the tensors named in `shapes`, each of its shape; a CheckpointError names the first
    that does not."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise CheckpointError(f"{file}: tensor {name} is missing")
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{file}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"this run needs {tuple(shape)}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise CheckpointError(f"{file}: tensor {extra[0]} does not belong to this run")


def restore_rng(rng: dict[str, Tensor]) -> None:
    """Set the RNG states saved in a checkpoint."""
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)

# ---------------------------------------------------------------- run.json and the log


def resumed_record(record: dict, command: list[str], step: int) -> dict:
    """run.json of a resumed run: the record it started with, plus when and from which step it was resumed."""
    record.setdefault("resumed", []).append({"command": command, "from_step": step,
                                             "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return record


def append_log(path: Path, entry: dict) -> None:
    """Add one line to train_log.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint at `step` (steps that the resumed run repeats), and a last line
    cut short when the run was killed."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and logged_step(line) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


def logged_step(line: str) -> float:
    """The step of one train_log.jsonl line (infinity for a line that is not a whole entry)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, TypeError, KeyError):
        return math.inf
