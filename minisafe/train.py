"""Fine-tuning with frozen layers (SPPFT) and SFT / DPO / unlearning alignment, in one plain loop.

train(cfg), top to bottom:
  1. check everything that can be wrong (flags, output directory, model, freeze spec, data) before writing anything;
  2. load the model, freeze (minisafe.freeze), tokenize; for dpo, the reference log-probabilities of every example
     with the model as loaded (that IS the frozen reference, so no second copy stays in memory);
  3. the loop: an optimizer step takes batch_size * grad_accum examples of a seeded per-epoch permutation, in
     grad_accum micro-batches; each micro-batch is split across processes (rows rank, rank + world, ...). Losses
     are sums divided by the count of the whole step (target tokens for sft, examples for dpo/unlearn), and
     gradients are summed across processes, so the update does not depend on grad_accum or on the number of
     processes. AdamW over the trainable parameters only, linear warm-up then cosine or linear decay to 0;
  4. training checkpoints (every --save-every steps, at --max-steps, on Ctrl-C), and at the end the model
     (an ordinary Hugging Face directory) and audit.json, after checking that no frozen tensor moved.

The output directory holds the model files (config.json, model.safetensors, tokenizer files), run.json (command,
seed, versions, input hashes, settings), train_log.jsonl (one JSON object per step: step, epoch, loss, lr,
grad_norm, tokens, tok_per_s, elapsed_s; and {"step", "val_loss"} after each validation) and audit.json (every tensor:
name, shape, trainable, sha256 before / after, changed, max_abs_change, relative_change = ||dW|| / ||W||, plus a
summary). checkpoint/ (model.safetensors, optimizer.safetensors, rng.safetensors, reference.safetensors for dpo,
state.json) exists while the run is unfinished; --resume continues from it bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

from minisafe import checkpoint, data
from minisafe.errors import CheckpointError, ConfigError, DataError
from minisafe.freeze import SCOPES, FreezeSpec, apply_freeze, freeze_rows, freeze_table, read_layer_spec
from minisafe.io import atomic_directory, atomic_write_json, atomic_write_text, content_hash, read_json, run_record
from minisafe.metrics import response_ids
from minisafe.model import Transformer
from minisafe.objectives import IGNORE, OBJECTIVES, pair_loss_sum, sequence_logps, sft_loss_sum
from minisafe.tokenizer import TEMPLATES, Tokenizer

FIELDS = {"sft": ("prompt", "response"), "dpo": ("prompt", "chosen", "rejected"),
          "unlearn": ("prompt", "chosen", "rejected")}
SCHEDULES = ("cosine", "linear")
DTYPES = ("float32", "bfloat16")
# Settings a resumed run may change; the rest must match the run being continued (inputs are compared by hash).
RESUMABLE = ("resume", "max_steps", "save_every", "eval_every", "progress", "command", "device", "model", "data",
             "val_data", "out", "fsdp")
AUDIT_FORMAT = 1
CHECKPOINT_FORMAT = 1

Example = tuple[tuple[list[int], list[int]], ...]  # one (ids, labels) sequence for sft; (chosen, rejected) for pairs


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    objective: str = "sft"
    freeze: str | None = None  # None / "none", FIRST:LAST, or a safety_layers.json
    freeze_scope: str = "attn_mlp"
    trainable: str | None = None
    frozen: str | None = None
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = no clipping
    max_len: int = 256
    max_steps: int | None = None  # stop after this many steps (the schedule still spans `epochs`)
    seed: int = 0
    dtype: str = "float32"  # autocast dtype; the weights and AdamW moments stay float32
    device: str = "cpu"
    template: str = "chat"
    loss_on_prompt: bool = False
    beta: float = 0.1
    unlearn_weight: float = 1.0
    val_data: str | None = None
    val_fraction: float = 0.0
    eval_every: int = 0  # 0 = validate at the end only (when there is a validation set)
    save_every: int = 200  # 0 = checkpoint only at --max-steps and on Ctrl-C
    resume: bool = False
    fsdp: bool = False
    progress: bool = True
    command: list[str] | None = None  # recorded in run.json instead of sys.argv


# ---------------------------------------------------------------- checks before anything is written


def check_config(cfg: TrainConfig) -> None:
    """Every flag value the loop cannot use is a ConfigError naming the flag."""
    choices = {"objective": OBJECTIVES, "template": TEMPLATES, "dtype": DTYPES, "schedule": SCHEDULES,
               "freeze_scope": SCOPES}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name, low in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0), ("max_len", 2),
                      ("eval_every", 0), ("save_every", 0)):
        if getattr(cfg, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {cfg.max_steps}")
    if cfg.lr <= 0 or cfg.beta <= 0 or cfg.grad_clip < 0 or cfg.weight_decay < 0:
        raise ConfigError("--lr and --beta must be positive; --grad-clip and --weight-decay must not be negative")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.val_data and cfg.val_fraction:
        raise ConfigError("give --val-data or --val-fraction, not both")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")


def check_output_dir(out: Path, resume: bool) -> None:
    """Without --resume the output directory must not exist (or be empty); with it, it must hold a checkpoint."""
    if resume:
        if not (out / "checkpoint" / "state.json").is_file():
            raise ConfigError(f"--resume: {out / 'checkpoint' / 'state.json'} not found; there is no unfinished run "
                              f"in {out} to continue")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists; choose a new --out, or pass --resume to continue the run saved there")


# ---------------------------------------------------------------- data


def read_rows(path: str, objective: str) -> list[dict]:
    """Dataset rows with the fields the objective needs (a DataError names the file, row and field otherwise)."""
    rows = data.read_dataset(path)
    need = FIELDS[objective]
    for number, row in enumerate(rows, start=1):
        for key in need:
            if not isinstance(row.get(key), str):
                raise DataError(f"{path}, row {number}: missing field '{key}' (a {objective} row needs "
                                f"{', '.join(need)}; this row has {', '.join(sorted(row)) or 'none'})")
    return rows


def response_tokens(tok: Tokenizer, prompt: str, response: str, template: str, prompt_ids: list[int]) -> list[int]:
    """Target tokens of a response: what the chat template writes after the prompt (its end-of-turn included),
    or, for alpaca and templates whose rendering does not extend the prompt, the text then EOS."""
    if template == "chat":
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        full = tok.encode(tok.render_chat(turns, add_generation_prompt=False), add_special_tokens=False)
        if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            return full[len(prompt_ids):]
    return response_ids(tok, response)


def encode(tok: Tokenizer, prompt: str, response: str, cfg: TrainConfig, prefix: str = "") -> tuple[list[int], list[int]]:
    """(input ids, labels) of one prompt + prefix + response, cut to max_len; labels are IGNORE on the prompt (unless
    loss_on_prompt) and on the response prefix, which the model reads as already written but is not trained on."""
    prompt_ids = tok.prompt_ids(prompt, cfg.template)
    target = response_tokens(tok, prompt, prefix + response, cfg.template, prompt_ids)
    untrained = prefix_tokens(tok, prompt, prefix, cfg.template, prompt_ids, target) if prefix else 0
    ids = prompt_ids + target
    labels = ids if cfg.loss_on_prompt else [IGNORE] * (len(prompt_ids) + untrained) + target[untrained:]
    return ids[:cfg.max_len], labels[:cfg.max_len]


def prefix_tokens(tok: Tokenizer, prompt: str, prefix: str, template: str, prompt_ids: list[int],
                  target: list[int]) -> int:
    """How many leading target tokens hold the response prefix; a token that straddles its end counts as prefix."""
    alone = tok.encode(tok.format_prompt(prompt, template) + prefix,
                       add_special_tokens=template == "alpaca")[len(prompt_ids):]
    shared = next((i for i, (a, b) in enumerate(zip(alone, target)) if a != b), len(alone))
    return min(len(target), shared + (shared < len(alone)))


def n_targets(labels: list[int]) -> int:
    """Tokens a sequence is trained on (the first token is never predicted)."""
    return sum(label != IGNORE for label in labels[1:])


def tokenize(rows: list[dict], tok: Tokenizer, cfg: TrainConfig, path: str, say: Callable = print) -> list[Example]:
    """Examples of the objective; rows with no target token left after truncation are dropped (with a note)."""
    keys = ("response",) if cfg.objective == "sft" else ("chosen", "rejected")
    examples = [tuple(encode(tok, row["prompt"], row[key], cfg, row.get("response_prefix", "") if key == "response"
                             else "") for key in keys) for row in rows]
    kept = [ex for ex in examples if all(n_targets(labels) for _, labels in ex)]
    if not kept:
        raise DataError(f"{path}: no example has a response token within --max-len {cfg.max_len}")
    if len(kept) < len(examples):
        say(f"note: {len(examples) - len(kept)} of {len(examples)} examples of {path} have no response token "
              f"within --max-len {cfg.max_len}; skipped")
    return kept


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random `fraction` of the examples is held out; both keep file order."""
    if not fraction:
        return examples, []
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise DataError(f"--val-fraction {fraction} leaves no training example out of {len(examples)}")
    held = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held])


def training_data(cfg: TrainConfig, tok: Tokenizer, say: Callable = print) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples from --data and --val-data or --val-fraction."""
    examples = tokenize(read_rows(cfg.data, cfg.objective), tok, cfg, cfg.data, say)
    if cfg.val_data:
        return examples, tokenize(read_rows(cfg.val_data, cfg.objective), tok, cfg, cfg.val_data, say)
    return split_validation(examples, cfg.val_fraction, cfg.seed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation seeded by seed + epoch, the same on every process."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded input_ids and labels [B, T] (IGNORE on padding)."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, (ids, lab) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
    return input_ids.to(device), labels.to(device)


def loss_count(examples: list[Example], indices: list[int], objective: str) -> int:
    """What a step's loss sum is divided by: target tokens (sft) or examples (dpo, unlearn)."""
    if objective == "sft":
        return sum(n_targets(examples[i][0][1]) for i in indices)
    return len(indices)


# ---------------------------------------------------------------- processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this call started the process group, so it also ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(device: str) -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when there is more than one process."""
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device.startswith("cuda") and world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        return Dist(rank, world, torch.device("cuda", torch.cuda.current_device()), owns)
    return Dist(rank, world, torch.device(device), owns)


def sum_across(tensor: Tensor, ranks: Dist) -> Tensor:
    """In-place sum over processes (a no-op for one process)."""
    if ranks.world > 1:
        dist.all_reduce(tensor)
    return tensor


def sum_gradients(params: list[nn.Parameter], ranks: Dist) -> None:
    """Sum the gradients of every process, in one flat buffer (data parallel without FSDP)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = sum_across(torch.cat([g.reshape(-1) for g in grads]), ranks)
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p)


def shard_model(model: Transformer, ranks: Dist) -> None:
    """FSDP2: shard each decoder layer, then the rest; gradients are summed (the loss is already normalised)."""
    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor on the CPU; an FSDP shard is gathered from every process (a collective)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's complete state dict on the CPU (every process must call this under FSDP)."""
    return {name: full_tensor(t) for name, t in model.state_dict().items()}


class StopRequest:
    """First Ctrl-C: finish the current step, save a checkpoint and stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested, self.previous = False, None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to stop at once)", flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def agreed(self, ranks: Dist) -> bool:
        """True when any process was asked to stop, so that all of them stop after the same step."""
        return bool(sum_across(torch.tensor([float(self.requested)], device=ranks.device), ranks).item())


# ---------------------------------------------------------------- losses


def micro_loss_sum(model: nn.Module, examples: list[Example], indices: list[int], cfg: TrainConfig,
                   reference: Tensor | None, pad_id: int, device: torch.device) -> Tensor:
    """Summed loss of some examples (one forward pass over their sequences, chosen rows before rejected ones)."""
    sequences = [examples[i][k] for k in range(len(examples[indices[0]])) for i in indices]
    input_ids, labels = collate(sequences, pad_id, device)
    # Right padding needs no attention mask: under causal attention a real token never sees the padding after it,
    # and its position is its index. This keeps the fast causal attention path.
    # The output layer runs inside the loss, at labelled positions only (objectives.token_nll).
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
        hidden = model(input_ids, skip_head=True)
        if cfg.objective == "sft":
            return sft_loss_sum(hidden, labels, model.head)
        ref = reference[indices].to(device) if reference is not None else None
        return pair_loss_sum(cfg.objective, hidden, labels, ref, cfg.beta, cfg.unlearn_weight, model.head)


def own_rows(batch: list[int], ranks: Dist) -> tuple[list[int], float]:
    """This process's rows of a global micro-batch, and 1.0. A process without rows still runs (FSDP needs every
    process in every forward): on the batch's first row, weighted 0.0."""
    mine = batch[ranks.rank::ranks.world]
    return (mine, 1.0) if mine else (batch[:1], 0.0)


@torch.no_grad()
def reference_logps(model: nn.Module, examples: list[Example], cfg: TrainConfig, pad_id: int, ranks: Dist) -> Tensor:
    """[N, 2]: summed log-probabilities of each (chosen, rejected) response under the model as it is now."""
    out = torch.zeros(len(examples), 2)
    starts = range(0, len(examples), cfg.batch_size)
    for start in tqdm(starts, desc="reference log-probs", disable=not (cfg.progress and ranks.main)):
        rows, weight = own_rows(list(range(start, min(start + cfg.batch_size, len(examples)))), ranks)
        sequences = [examples[i][k] for k in (0, 1) for i in rows]
        input_ids, labels = collate(sequences, pad_id, ranks.device)
        with torch.autocast(ranks.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            logps = sequence_logps(model(input_ids, skip_head=True), labels, model.head).float().cpu()
        if weight:
            out[rows] = torch.stack(logps.chunk(2), dim=1)
    return sum_across(out.to(ranks.device), ranks).cpu()


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[Example], cfg: TrainConfig, reference: Tensor | None,
                    pad_id: int, ranks: Dist) -> float:
    """The objective over the whole validation set, normalised as in training."""
    total = torch.zeros(1, device=ranks.device)
    for start in range(0, len(examples), cfg.batch_size):
        rows, weight = own_rows(list(range(start, min(start + cfg.batch_size, len(examples)))), ranks)
        total += weight * micro_loss_sum(model, examples, rows, cfg, reference, pad_id, ranks.device).float()
    return sum_across(total, ranks).item() / loss_count(examples, list(range(len(examples))), cfg.objective)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                   examples: list[Example], indices: list[int], lr: float, cfg: TrainConfig, reference: Tensor | None,
                   pad_id: int, ranks: Dist) -> tuple[float, float]:
    """One AdamW step on the examples `indices` (all processes together); returns the step's loss and gradient norm."""
    count = loss_count(examples, indices, cfg.objective)
    step_loss = torch.zeros((), device=ranks.device)
    for start in range(0, len(indices), cfg.batch_size):
        rows, weight = own_rows(indices[start:start + cfg.batch_size], ranks)
        loss = micro_loss_sum(model, examples, rows, cfg, reference, pad_id, ranks.device) * (weight / count)
        loss.backward()
        step_loss += loss.detach()
    if ranks.world > 1 and not cfg.fsdp:
        sum_gradients(params, ranks)  # FSDP has summed them already, during backward
    # With no clipping asked for, max_norm = inf still reports the norm and scales the gradients by exactly 1.
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum_across(step_loss, ranks).item(), grad_norm.item()


def learning_rate(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up over `warmup` steps, then decay towards 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)


# ---------------------------------------------------------------- checkpoints


def optimizer_tensors(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """AdamW state as 'name:key' tensors (step, exp_avg, exp_avg_sq), whole and on the CPU."""
    return {f"{name}:{key}": full_tensor(value) for name, p in params.items()
            for key, value in optimizer.state.get(p, {}).items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                           tensors: dict[str, Tensor]) -> None:
    """Put 'name:key' tensors back as AdamW state (resharded like each parameter under FSDP)."""
    state: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, part = key.rsplit(":", 1)
        if name not in params:
            raise CheckpointError(f"checkpoint optimizer state names {name}, which is not trainable in this run")
        p = params[name]
        if isinstance(p, DTensor) and value.shape == p.shape:
            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        state.setdefault(name, {})[part] = value.to(p.device) if not isinstance(value, DTensor) else value
    for name, values in state.items():
        optimizer.state[params[name]] = values


def save_checkpoint(path: Path, model_state: dict[str, Tensor], optimizer_state: dict[str, Tensor],
                    references: dict[str, Tensor], position: dict) -> None:
    """Write checkpoint/ atomically: weights, AdamW state, RNG states, dpo reference log-probs, position."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_directory(path) as tmp:
        save_file({n: t.contiguous() for n, t in model_state.items()}, str(tmp / "model.safetensors"))
        save_file({n: t.contiguous() for n, t in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        if references:
            save_file(references, str(tmp / "reference.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, **position}, indent=2) + "\n")


def restore_rng(path: Path) -> None:
    """Set the RNG states saved in a checkpoint."""
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def check_resumable(out: Path, cfg: TrainConfig, inputs: dict[str, str | None]) -> dict:
    """The run.json of the run being resumed, after checking that its settings and input hashes match this one."""
    record = read_json(out / "run.json", ConfigError)
    if not record:
        raise ConfigError(f"--resume: {out / 'run.json'} is missing; cannot tell which run {out} holds")
    before, now = record["settings"], settings_of(cfg)
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE and before.get(k) != now[k]]
    if record.get("seed") != cfg.seed:
        changed.append(f"--seed {record.get('seed')!r} -> {cfg.seed!r}")
    for name, path in inputs.items():
        saved = record["inputs"].get(name, {}).get("sha256")
        if path is not None and saved != content_hash(path):
            changed.append(f"{name} {path} has changed since the run started (sha256 differs)")
    if changed:
        raise ConfigError(f"--resume: settings differ from the run in {out}: " + "; ".join(changed))
    return record


def command_line(cfg: TrainConfig) -> list[str]:
    """The command recorded in run.json: cfg.command when the caller gives one, else this process's argv."""
    return cfg.command or [Path(sys.argv[0]).name, *sys.argv[1:]]


def settings_of(cfg: TrainConfig) -> dict:
    """The run's settings as recorded in run.json (the seed and the command have their own fields)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("command", "seed")}


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint at `step` (steps that the resumed run repeats)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------- audit


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's raw bytes (dtype and layout as stored)."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def build_audit(before: dict[str, Tensor], after: dict[str, Tensor], trainable: set[str]) -> dict:
    """Per tensor: shape, trainable, hashes before / after, largest absolute change, ||dW|| / ||W||; and a summary."""
    rows = []
    for name, old in before.items():
        new = after[name]
        diff = (new.double() - old.double())
        norm = old.double().norm().item()
        h_old, h_new = tensor_sha256(old), tensor_sha256(new)
        rows.append({"name": name, "shape": list(old.shape), "trainable": name in trainable,
                     "sha256_before": h_old, "sha256_after": h_new, "changed": h_old != h_new,
                     "max_abs_change": diff.abs().max().item() if diff.numel() else 0.0,
                     "relative_change": diff.norm().item() / norm if norm else None})
    count = lambda trainable_, changed: sum(r["trainable"] == trainable_ and r["changed"] == changed for r in rows)
    summary = {"tensors": len(rows), "changed": sum(r["changed"] for r in rows),
               "unchanged": sum(not r["changed"] for r in rows),
               "trainable_changed": count(True, True), "trainable_unchanged": count(True, False),
               "frozen_changed": count(False, True), "frozen_unchanged": count(False, False),
               "trainable_parameters": sum(before[r["name"]].numel() for r in rows if r["trainable"]),
               "frozen_parameters": sum(before[r["name"]].numel() for r in rows if not r["trainable"])}
    return {"format": AUDIT_FORMAT, "summary": summary, "tensors": rows}


def verify_audit(audit: dict) -> None:
    """Fail loudly if any frozen tensor differs from the start of the run by a single bit."""
    moved = [r["name"] for r in audit["tensors"] if not r["trainable"] and r["changed"]]
    if moved:
        raise RuntimeError(f"{len(moved)} FROZEN tensor(s) changed during training (a bug; the model was not "
                           f"saved): {', '.join(moved[:10])}{' ...' if len(moved) > 10 else ''}")


def write_final(out: Path, model: Transformer, state: dict[str, Tensor], tok: Tokenizer, cfg: TrainConfig,
                trainable: list[str], start_hashes: dict[str, str], sharded: bool) -> dict:
    """audit.json, the frozen-tensor check, then the model files into out/ (beside the run's other files)."""
    base, _ = checkpoint.load(cfg.model, dtype=torch.float32)
    before = base.state_dict()
    if any(tensor_sha256(t) != start_hashes[n] for n, t in before.items()):
        raise CheckpointError(f"{cfg.model}: the weights on disk changed during training; cannot audit the run")
    audit = build_audit(before, state, set(trainable))
    audit.update(model=cfg.model, freeze=cfg.freeze, freeze_scope=cfg.freeze_scope, trainable_regex=cfg.trainable,
                 frozen_regex=cfg.frozen)
    atomic_write_json(out / "audit.json", audit)
    del base, before
    verify_audit(audit)
    if sharded:  # the FSDP model holds shards: save a plain model built around the gathered weights
        with torch.device("meta"):
            model = Transformer(model.config)
        model.load_state_dict(state, assign=True)
    tmp = out / ".model.partial"
    checkpoint.save(model, tok, tmp)
    for file in tmp.iterdir():  # each file is replaced atomically; the run's other files stay
        os.replace(file, out / file.name)
    tmp.rmdir()
    return audit["summary"]


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or --resume) one training run; returns a summary. on_step(step) is called after every optimizer step."""
    check_config(cfg)
    out = Path(cfg.out)
    check_output_dir(out, cfg.resume)
    ranks = start_processes(cfg.device)
    try:
        return _train(cfg, out, ranks, on_step)
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, out: Path, ranks: Dist, on_step: Callable[[int], None] | None) -> dict:
    say = print if ranks.main else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    model, tok = checkpoint.load(cfg.model, dtype=torch.float32, device=ranks.device)
    spec = FreezeSpec(read_layer_spec(cfg.freeze), cfg.freeze_scope, cfg.trainable, cfg.frozen)
    trainable = apply_freeze(model, spec)
    train_set, val_set = training_data(cfg, tok, say)
    inputs = {"model": cfg.model, "data": cfg.data, "val_data": cfg.val_data}
    record = check_resumable(out, cfg, inputs) if cfg.resume else None
    if ranks.world > 1:
        dist.barrier()  # every process has checked the output directory before the first one creates it

    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(train_set) / per_step)
    total_steps = cfg.epochs * steps_per_epoch
    say(freeze_table(model))
    say(f"{len(train_set)} training examples, {len(val_set)} validation; {steps_per_epoch} steps per epoch, "
        f"{total_steps} in all; {per_step} examples per step on {ranks.world} process(es)")
    start_hashes = {name: tensor_sha256(t) for name, t in model.state_dict().items()}

    ckpt = out / "checkpoint"
    if cfg.resume:
        position = read_json(ckpt / "state.json", CheckpointError)
        model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(ranks.device)))
        restore_rng(ckpt)
        record.setdefault("resumed", []).append({"command": command_line(cfg), "from_step": position["step"],
                                                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        if ranks.main:
            atomic_write_json(out / "run.json", record)
            truncate_log(out / "train_log.jsonl", position["step"])
    else:
        position = {"step": 0}
        if ranks.main:
            record = run_record(cfg.seed, inputs, **settings_of(cfg), freeze_layers=spec.layers,
                                trainable_tensors=len(trainable), world_size=ranks.world,
                                freeze_table=freeze_rows(model))
            record["command"] = command_line(cfg)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "run.json", record)

    reference = val_reference = None
    if cfg.objective == "dpo":
        if cfg.resume:
            saved = load_file(str(ckpt / "reference.safetensors"))
            reference, val_reference = saved["reference_logps"], saved.get("val_reference_logps")
        else:
            reference = reference_logps(model, train_set, cfg, tok.pad_token_id, ranks)
            val_reference = reference_logps(model, val_set, cfg, tok.pad_token_id, ranks) if val_set else None

    if cfg.fsdp and ranks.world > 1:
        shard_model(model, ranks)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # The fused kernel updates every parameter in one pass; FSDP's sharded parameters take the plain loop.
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=not (cfg.fsdp and ranks.world > 1))
    if cfg.resume:
        load_optimizer_tensors(optimizer, params, load_file(str(ckpt / "optimizer.safetensors")))

    def log(entry: dict) -> None:
        if ranks.main:
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    validated: dict[int, float] = {}

    def validate(step: int) -> float:
        if step not in validated:  # the end of a run may coincide with a periodic validation
            validated[step] = validation_loss(model, val_set, cfg, val_reference, tok.pad_token_id, ranks)
            log({"step": step, "val_loss": validated[step]})
        return validated[step]

    def checkpoint_now(step: int) -> None:
        state, opt_state = full_state(model), optimizer_tensors(optimizer, params)  # collectives under FSDP
        references = {k: v for k, v in (("reference_logps", reference), ("val_reference_logps", val_reference))
                      if v is not None}
        if ranks.main:
            # The data position is the step: epoch = step // steps_per_epoch; the LR is a function of the step.
            save_checkpoint(ckpt, state, opt_state, references, {
                "step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                "total_steps": total_steps, "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps})

    step, stopped, last_loss = position["step"], "completed", None
    tokens_done, started = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (cfg.progress and ranks.main))
    with StopRequest() as stop:
        while step < total_steps:
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = "max_steps"
                break
            epoch, within = divmod(step, steps_per_epoch)
            indices = epoch_order(len(train_set), cfg.seed, epoch)[within * per_step:(within + 1) * per_step]
            tokens = sum(len(ids) for i in indices for ids, _ in train_set[i])
            lr = learning_rate(step, total_steps, cfg.warmup_steps, cfg.lr, cfg.schedule)
            t0 = time.perf_counter()
            last_loss, grad_norm = optimizer_step(model, optimizer, list(params.values()), train_set, indices, lr, cfg,
                                                  reference, tok.pad_token_id, ranks)
            step += 1
            seconds = time.perf_counter() - t0
            tokens_done += tokens
            log({"step": step, "epoch": epoch, "loss": last_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                 "tok_per_s": tokens / seconds, "elapsed_s": time.perf_counter() - started})
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
            bar.update(1)
            if val_set and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                validate(step)
            if on_step is not None:
                on_step(step)
            if stop.agreed(ranks):
                stopped = "interrupted"
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint_now(step)
    bar.close()

    seconds = time.perf_counter() - started
    summary = {"stopped": stopped, "step": step, "total_steps": total_steps, "loss": last_loss,
               "tokens": tokens_done, "seconds": seconds, "tok_per_s": tokens_done / seconds if seconds else None,
               "trainable_parameters": sum(p.numel() for p in params.values()), "out": str(out), "main": ranks.main}
    if stopped != "completed":
        checkpoint_now(step)
        summary["checkpoint"] = str(ckpt)
        if stopped == "interrupted":
            return summary
    if val_set:
        summary["val_loss"] = validate(step)
    state = full_state(model)
    if ranks.main:
        summary["audit"] = write_final(out, model, state, tok, cfg, trainable, start_hashes,
                                       sharded=cfg.fsdp and ranks.world > 1)
        if stopped == "completed" and ckpt.exists():
            shutil.rmtree(ckpt)
    if ranks.world > 1:
        dist.barrier()  # the files are complete before any process returns
    return summary
