"""The audit of a fine-tune: which tensors changed, by how much, and a re-check anyone can run afterwards.

train.py writes audit.json beside the model it saves (format 1):
  {"format": 1, "summary": {tensors, changed, unchanged, trainable_changed, trainable_unchanged, frozen_changed,
                            frozen_unchanged, trainable_parameters, frozen_parameters},
   "tensors": [{name, shape, trainable, sha256_before, sha256_after, changed, max_abs_change,
                relative_change = ||dW|| / ||W|| (null for an all-zero tensor),
                and for a tensor with frozen rows (--freeze-random-neurons): frozen_rows, frozen_rows_sha256_before,
                frozen_rows_sha256_after, frozen_rows_changed, frozen_row_parameters}, ...],
   "model", "freeze", "freeze_scope", "trainable_regex", "frozen_regex", "freeze_random_neurons"}
The summary also counts tensors_with_frozen_rows, frozen_row_parameters and frozen_rows_changed.
Hashes are sha256 of each tensor's raw float32 bytes, the dtype training runs in, whatever the checkpoint stores.

Re-check a trained model later (nothing is written):
    python -m minisafe.audit DIR [--base DIR0]
re-hashes every tensor of the model in DIR against the sha256_after of its audit.json and, given --base, checks that
every frozen tensor is bit-identical to the model the run started from. Exit 0: all match; 1: one line per mismatch;
2: bad input (no audit.json, not a model directory).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from minisafe import checkpoint
from minisafe.cli import option, parse_config, script
from minisafe.errors import CheckpointError
from minisafe.io import read_json

AUDIT_FORMAT = 1


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's raw bytes (dtype and layout as stored)."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def build_audit(before: dict[str, Tensor], after: dict[str, Tensor], trainable: set[str],
                frozen_rows: dict[str, list[int]] | None = None) -> dict:
    """Per tensor: shape, trainable, hashes before / after, largest absolute change, ||dW|| / ||W||, and for a tensor
    with frozen rows (NFFT) the rows and their hashes before / after; and a summary."""
    frozen_rows = frozen_rows or {}
    rows = []
    for name, old in before.items():
        new = after[name]
        diff = (new.double() - old.double())
        norm = old.double().norm().item()
        h_old, h_new = tensor_sha256(old), tensor_sha256(new)
        row = {"name": name, "shape": list(old.shape), "trainable": name in trainable,
               "sha256_before": h_old, "sha256_after": h_new, "changed": h_old != h_new,
               "max_abs_change": diff.abs().max().item() if diff.numel() else 0.0,
               "relative_change": diff.norm().item() / norm if norm else None}
        if name in frozen_rows:
            row.update(frozen_rows_record(old, new, frozen_rows[name]))
        rows.append(row)
    count = lambda trainable_, changed: sum(r["trainable"] == trainable_ and r["changed"] == changed for r in rows)
    summary = {"tensors": len(rows), "changed": sum(r["changed"] for r in rows),
               "unchanged": sum(not r["changed"] for r in rows),
               "trainable_changed": count(True, True), "trainable_unchanged": count(True, False),
               "frozen_changed": count(False, True), "frozen_unchanged": count(False, False),
               "trainable_parameters": sum(before[r["name"]].numel() for r in rows if r["trainable"]),
               "frozen_parameters": sum(before[r["name"]].numel() for r in rows if not r["trainable"]),
               "tensors_with_frozen_rows": len(frozen_rows),
               "frozen_row_parameters": sum(r["frozen_row_parameters"] for r in rows if "frozen_rows" in r),
               "frozen_rows_changed": sum(r.get("frozen_rows_changed", False) for r in rows)}
    return {"format": AUDIT_FORMAT, "summary": summary, "tensors": rows}


def frozen_rows_record(before: Tensor, after: Tensor, rows: list[int]) -> dict:
    """The frozen rows of one tensor, the sha256 of those rows before and after, and whether they changed."""
    index = torch.tensor(rows, dtype=torch.long)
    h_old, h_new = tensor_sha256(before[index]), tensor_sha256(after[index])
    return {"frozen_rows": rows, "frozen_rows_sha256_before": h_old, "frozen_rows_sha256_after": h_new,
            "frozen_rows_changed": h_old != h_new, "frozen_row_parameters": before[index].numel()}


def verify_audit(audit: dict) -> None:
    """Fail loudly if any frozen tensor, or any frozen row of a trainable one, differs from the start of the run by a
    single bit."""
    moved = [r["name"] for r in audit["tensors"] if not r["trainable"] and r["changed"]]
    moved += [f"{r['name']} (frozen rows)" for r in audit["tensors"] if r.get("frozen_rows_changed")]
    if moved:
        raise RuntimeError(f"{len(moved)} FROZEN tensor(s) changed during training (a bug; the model was not "
                           f"saved): {', '.join(moved[:10])}{' ...' if len(moved) > 10 else ''}")


def float32_state(model_dir: str | Path) -> dict[str, Tensor]:
    """Every tensor of a model directory by its Hugging Face name, as float32 (what training hashes)."""
    model, _ = checkpoint.load(model_dir, dtype=torch.float32)
    return {name: t.detach() for name, t in model.state_dict().items()}


def audit_run(base_dir: str | Path, after: dict[str, Tensor], trainable: set[str], start_hashes: dict[str, str],
              frozen_rows: dict[str, list[int]] | None = None) -> dict:
    """The audit of a run: the starting weights, re-read from base_dir and checked against their hashes at the
    start of the run (so that a file replaced during training cannot pass), against the weights `after`."""
    before = float32_state(base_dir)
    if any(tensor_sha256(t) != start_hashes.get(n) for n, t in before.items()):
        raise CheckpointError(f"{base_dir}: the weights on disk changed during training; cannot audit the run")
    return build_audit(before, after, trainable, frozen_rows)


# ---------------------------------------------------------------- the re-check


def read_audit(model_dir: Path) -> dict[str, dict]:
    """The tensor rows of model_dir/audit.json by name (a CheckpointError names the file if it is not an audit)."""
    path = model_dir / "audit.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a model directory")
    audit = read_json(path, CheckpointError)
    if audit is None:
        raise CheckpointError(f"{path} not found: {model_dir} holds no model written by train.py")
    rows = audit.get("tensors") if isinstance(audit, dict) else None
    keys = ("name", "trainable", "sha256_after")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in keys) for r in rows):
        raise CheckpointError(f"{path}: not an audit written by train.py (expected 'tensors' rows with "
                              f"{', '.join(keys)})")
    return {r["name"]: r for r in rows}


def bit_difference(a: Tensor, b: Tensor) -> str:
    """How two same-named tensors differ: shape, or how many elements differ in their bits and by how much."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} instead of {tuple(b.shape)}"
    bits_a, bits_b = (t.contiguous().reshape(a.numel(), -1).view(torch.uint8) for t in (a, b))
    n = (bits_a != bits_b).any(dim=1).sum().item()
    largest = (a.double() - b.double()).abs().max().item()
    return f"{n} of {a.numel()} elements differ (largest difference {largest:.6g})"


def recheck(model_dir: str | Path, base_dir: str | Path | None = None) -> list[str]:
    """One line per mismatch between the model in model_dir, its audit.json and (given) the starting model."""
    model_dir = Path(model_dir)
    rows = read_audit(model_dir)
    state = float32_state(model_dir)
    problems = [f"{name}: listed in audit.json but missing from the model" for name in rows if name not in state]
    problems += [f"{name}: in the model but not in audit.json" for name in state if name not in rows]
    problems += [f"{name}: sha256 of the weights differs from audit.json's sha256_after" for name, t in state.items()
                 if name in rows and tensor_sha256(t) != rows[name]["sha256_after"]]
    if base_dir is not None:
        base = float32_state(base_dir)
        for name, row in rows.items():
            if row["trainable"] or name not in state:
                continue
            if name not in base:
                problems.append(f"{name}: frozen, but missing from the base model {base_dir}")
            elif tensor_sha256(state[name]) != tensor_sha256(base[name]):
                problems.append(f"{name}: frozen, but not bit-identical to the base model: "
                                f"{bit_difference(state[name], base[name])}")
        problems += frozen_row_problems(rows, state, base)
    return problems


def frozen_row_problems(rows: dict[str, dict], state: dict[str, Tensor], base: dict[str, Tensor]) -> list[str]:
    """One line per tensor whose frozen rows (NFFT) are not bit-identical to the base model's."""
    problems = []
    for name, row in rows.items():
        if "frozen_rows" in row and name in state and name in base:
            index = torch.tensor(row["frozen_rows"], dtype=torch.long)
            if tensor_sha256(state[name][index]) != tensor_sha256(base[name][index]):
                problems.append(f"{name}: its frozen rows are not bit-identical to the base model: "
                                f"{bit_difference(state[name][index], base[name][index])}")
    return problems


@dataclass
class AuditCommand:
    """The command line of python -m minisafe.audit."""
    model: str = option(help="a model directory written by train.py (with its audit.json)", positional=True,
                        metavar="DIR")
    base: str | None = option(None, "the model the run started from: frozen tensors must equal it", metavar="DIR0")


@script()
def main(argv: list[str] | None = None) -> int:
    """python -m minisafe.audit DIR [--base DIR0]: 0 if everything matches, 1 naming each mismatch, 2 for bad input."""
    a = parse_config(AuditCommand, argv, __doc__.split("\n")[0], prog="python -m minisafe.audit")
    problems = recheck(a.model, a.base)
    for line in problems:
        print(f"mismatch: {line}")
    if problems:
        return 1
    against = f"; every frozen tensor is bit-identical to {a.base}" if a.base else ""
    print(f"ok: every tensor of {a.model} matches its audit.json{against}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
