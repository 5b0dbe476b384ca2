"""Which parameters a fine-tune may change: a layer range (SPPFT), name patterns, and a table of the result.

A freeze is nothing but requires_grad = False on some parameters; the training loop hands the optimizer only the
trainable ones, so frozen tensors get no gradient and no optimizer state. The rules, in order:
1. every parameter starts trainable;
2. --trainable REGEX: only parameters whose name matches stay trainable;
3. --freeze FIRST:LAST (or a safety_layers.json): the layers' attention and MLP tensors (scope attn_mlp, the paper's
   code: every name under model.layers.N.self_attn. or model.layers.N.mlp., Gemma 3's q_norm/k_norm included),
   or every tensor of those layers (scope all, norms included), are frozen;
4. --frozen REGEX: parameters whose name matches are frozen too.
Patterns are Python regular expressions searched in the Hugging Face parameter names.

Neuron-level freezing (the paper's NFFT control, --freeze-random-neurons N or like:SPEC) works inside tensors: it
freezes randomly chosen output rows (neurons) of the attention and MLP projection weights across the whole model,
with the matching bias entries, until N parameters are frozen (like:SPEC = as many as SPPFT with that layer spec
freezes). Only rows of tensors that are still trainable after rules 1-4 are drawn, with the run's seed; the training
loop zeroes their gradients and puts their values back after every optimizer step, so they stay bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minisafe.errors import ConfigError
from minisafe.io import read_json

SCOPES = ("attn_mlp", "all")
ATTN_MLP = ("self_attn", "mlp")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.([^.]+)\.")
ADAMW_STATE_BYTES = 2 * 4  # exp_avg and exp_avg_sq, float32, per trainable parameter


@dataclass
class FreezeSpec:
    layers: tuple[int, int] | None = None  # FIRST, LAST: 0-based, both inclusive
    scope: str = "attn_mlp"
    trainable: str | None = None
    frozen: str | None = None


def parse_layer_range(text: str) -> tuple[int, int]:
    """'FIRST:LAST' (0-based, both inclusive) as a pair of ints."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"layer range {text!r} is not FIRST:LAST (0-based, both inclusive, e.g. 6:11)")
    first, last = int(match[1]), int(match[2])
    if first > last:
        raise ConfigError(f"layer range {text!r}: FIRST ({first}) is after LAST ({last})")
    return first, last


def read_layer_spec(spec: str | None) -> tuple[int, int] | None:
    """--freeze: None or 'none', FIRST:LAST, or a safety_layers.json written by locate.py ({"first": .., "last": ..})."""
    if spec is None or spec.strip().lower() == "none":
        return None
    if re.fullmatch(r"[\d\s:]+", spec):
        return parse_layer_range(spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--freeze {spec!r}: neither FIRST:LAST, 'none', nor an existing safety_layers.json file")
    found = read_json(path, ConfigError)
    if not isinstance(found, dict):
        raise ConfigError(f"{path}: expected a JSON object with integer 'first' and 'last' fields (as locate.py "
                          f"writes them), got {type(found).__name__}")
    for key in ("first", "last"):
        if type(found.get(key)) is not int or found[key] < 0:  # bool is an int subclass, and true is no layer
            raise ConfigError(f"{path}: field '{key}' is {found.get(key)!r}; expected integer 'first' and 'last' "
                              "fields (layer numbers >= 0, as locate.py writes them)")
    return parse_layer_range(f"{found['first']}:{found['last']}")


def check_layer_range(num_layers: int, first: int, last: int) -> None:
    """Raise a ConfigError unless first..last (0-based, inclusive, FIRST <= LAST) lies inside a num_layers-layer model,
    naming the range and the first layer of it the model does not have."""
    if first > last:
        raise ConfigError(f"layer range {first}:{last}: FIRST ({first}) is after LAST ({last})")
    missing = next((layer for layer in (first, last) if not 0 <= layer < num_layers), None)
    if missing is not None:
        raise ConfigError(f"layer range {first}:{last}: layer {missing} is outside this {num_layers}-layer model "
                          f"(layers 0..{num_layers - 1}, both inclusive)")


def layer_of(name: str) -> int | None:
    """Decoder layer index of a parameter name, or None for embeddings, final norm and head."""
    match = _LAYER.match(name)
    return int(match[1]) if match else None


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None


def _matching(names: list[str], pattern: str, flag: str) -> set[str]:
    """The names the regex of `flag` finds; matching none is an error (a typo would silently change nothing)."""
    regex = _compile(pattern, flag)
    matched = {n for n in names if regex.search(n)}
    if not matched:
        raise ConfigError(f"{flag} {pattern!r} matches no parameter name "
                          f"(names look like {names[0]}, model.layers.0.mlp.down_proj.weight)")
    return matched


def trainable_names(names: list[str], num_layers: int, spec: FreezeSpec) -> list[str]:
    """The names that stay trainable under spec (the rules in the module docstring); checks the spec first."""
    if spec.scope not in SCOPES:
        raise ConfigError(f"--freeze-scope must be one of {', '.join(SCOPES)}, got {spec.scope!r}")
    keep = set(names)
    if spec.trainable is not None:
        keep = _matching(names, spec.trainable, "--trainable")
    if spec.layers is not None:
        first, last = spec.layers
        check_layer_range(num_layers, first, last)
        for name in names:
            match = _LAYER.match(name)
            if match and first <= int(match[1]) <= last and (spec.scope == "all" or match[2] in ATTN_MLP):
                keep.discard(name)
    if spec.frozen is not None:
        keep -= _matching(names, spec.frozen, "--frozen")
    if not keep:
        raise ConfigError("these freeze settings leave no parameter to train")
    return [n for n in names if n in keep]


def apply_freeze(model: nn.Module, spec: FreezeSpec) -> list[str]:
    """Set requires_grad on every parameter of model according to spec; return the trainable names."""
    names = [n for n, _ in model.named_parameters()]
    keep = set(trainable_names(names, model.config.num_layers, spec))
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return [n for n in names if n in keep]


def projection_names(model: nn.Module) -> list[str]:
    """The attention and MLP projection weights (2-D tensors under self_attn. / mlp.) that are trainable."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and (m := _LAYER.match(name)) and m[2] in ATTN_MLP]


def frozen_by_layers(model: nn.Module, spec: str, scope: str = "attn_mlp") -> int:
    """How many parameters freezing the layers of spec (FIRST:LAST or a safety_layers.json) freezes, on their own."""
    names = [n for n, _ in model.named_parameters()]
    keep = set(trainable_names(names, model.config.num_layers, FreezeSpec(read_layer_spec(spec), scope)))
    return sum(p.numel() for n, p in model.named_parameters() if n not in keep)


def neuron_count(model: nn.Module, text: str) -> int:
    """--freeze-random-neurons: N, or like:SPEC (as many parameters as freezing SPEC's layers freezes)."""
    if text.startswith("like:"):
        return frozen_by_layers(model, text.removeprefix("like:"))
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--freeze-random-neurons {text!r}: expected a positive number of parameters or like:SPEC "
                          "(like:13:14, like:runs/x/safety_layers.json)")
    return int(text)


def random_neurons(model: nn.Module, count: int, seed: int) -> dict[str, list[int]]:
    """Seeded random output rows of the trainable projection weights, drawn until they (with their bias entries)
    hold at least `count` parameters; {weight name: sorted rows}."""
    params = dict(model.named_parameters())
    rows = [(name, row) for name in projection_names(model) for row in range(params[name].shape[0])]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: dict[str, list[int]] = {}
    total = 0
    for i in order:
        if total >= count:
            break
        name, row = rows[i]
        chosen.setdefault(name, []).append(row)
        total += params[name].shape[1] + (1 if bias_name(name) in params else 0)
    if total < count:
        raise ConfigError(f"--freeze-random-neurons: asked for {count:,} parameters, the trainable attention and MLP "
                          f"rows hold only {total:,}")
    return {name: sorted(found) for name, found in sorted(chosen.items())}


def bias_name(weight_name: str) -> str:
    """The bias that belongs to a projection weight (present for Qwen2's q, k and v)."""
    return weight_name.removesuffix(".weight") + ".bias"


def neuron_parameters(model: nn.Module, neurons: dict[str, list[int]]) -> int:
    """Parameters held by frozen rows (each weight row, plus its bias entry where the projection has a bias)."""
    params = dict(model.named_parameters())
    return sum(len(rows) * (params[n].shape[1] + (bias_name(n) in params)) for n, rows in neurons.items())


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def freeze_rows(model: nn.Module) -> list[dict]:
    """Per decoder layer (plus 'other': embeddings, final norm, head, and 'total'): tensor and parameter counts."""
    rows: dict[str, dict] = {str(i): {} for i in range(model.config.num_layers)}
    rows["other"], rows["total"] = {}, {}
    for name, param in model.named_parameters():
        layer = layer_of(name)
        for key in (str(layer) if layer is not None else "other", "total"):
            row = rows[key]
            kind = "trainable" if param.requires_grad else "frozen"
            row[f"{kind}_tensors"] = row.get(f"{kind}_tensors", 0) + 1
            row[f"{kind}_params"] = row.get(f"{kind}_params", 0) + param.numel()
    out = []
    for key, row in rows.items():
        row = {k: row.get(k, 0) for k in ("trainable_tensors", "frozen_tensors", "trainable_params", "frozen_params")}
        total = row["trainable_params"] + row["frozen_params"]
        out.append({"layer": key, **row, "share_trainable": row["trainable_params"] / total if total else 0.0,
                    "optimizer_state_bytes": ADAMW_STATE_BYTES * row["trainable_params"]})
    return out


def freeze_table(model: nn.Module) -> str:
    """The per-layer table printed before training (optimizer state = AdamW's two float32 moments)."""
    header = ("layer", "trainable", "frozen", "trainable params", "frozen params", "share trainable", "optimizer state")
    lines = [header]
    for row in freeze_rows(model):
        lines.append((row["layer"], str(row["trainable_tensors"]), str(row["frozen_tensors"]),
                      f"{row['trainable_params']:,}", f"{row['frozen_params']:,}", f"{row['share_trainable']:.1%}",
                      _bytes(row["optimizer_state_bytes"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)
