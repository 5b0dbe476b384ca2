"""Fine-tuning with frozen layers (SPPFT) and SFT / DPO / unlearning alignment, in one plain loop.

train(cfg), top to bottom, in three parts (as torchtune's recipes: setup, loop, finish):
  0. check everything that can be wrong (flags, --out writable, model, freeze spec, data, a checkpoint to resume)
     before writing anything;
  1. setup: load the model, freeze (minisafe.freeze), tokenize; for dpo, the reference log-probabilities of every
     example with the model as loaded (that IS the frozen reference, so no second copy stays in memory);
  2. the loop: an optimizer step takes batch_size * grad_accum examples of a seeded per-epoch permutation, in
     grad_accum micro-batches; each micro-batch is split across processes (rows rank, rank + world, ...), and a
     process's sequences run as one forward pass, packed end to end without padding (forward_packed). Losses
     are sums divided by the count of the whole step (target tokens for sft, examples for dpo/unlearn), and
     gradients are summed across processes, so the update does not depend on grad_accum or on the number of
     processes. AdamW over the trainable parameters only, linear warm-up then cosine or linear decay to 0. The
     first step whose loss or gradient norm is not finite stops the run with a TrainingError; nothing is saved;
  3. finish: training checkpoints (every --save-every steps, at --max-steps, on Ctrl-C), and at the end the model
     (an ordinary Hugging Face directory) and audit.json (minisafe.audit), after checking that no frozen tensor moved.

The output directory holds the model files (config.json, model.safetensors, tokenizer files), run.json (command,
seed, versions, input hashes, settings), train_log.jsonl (one JSON object per step: step, epoch, loss, lr,
grad_norm, tokens, tok_per_s, elapsed_s; and {"step", "val_loss"} after each validation) and audit.json (every tensor:
name, shape, trainable, sha256 before / after, changed, max_abs_change, relative_change = ||dW|| / ||W||, plus a
summary; re-check it with `python -m minisafe.audit DIR --base MODEL`). checkpoint/ (model.safetensors,
optimizer.safetensors, rng.safetensors, reference.safetensors for dpo, state.json) exists while the run is unfinished;
--resume continues from it bit for bit. A run killed before its first checkpoint leaves only run.json and
train_log.jsonl: running it again (with or without --resume) removes them and starts from step 0. Files half-written
by a killed run (.*.partial, .*.tmp) are removed; a folder train.py did not write is never touched.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

from minisafe import checkpoint, data
from minisafe.audit import audit_run, tensor_sha256, verify_audit
from minisafe.checkpoint import DTYPES
from minisafe.cli import (check_fields, device_name, fraction, non_negative_float, non_negative_int, option, output_dir,
                          positive_float, positive_int, share, whole)
from minisafe.errors import CheckpointError, ConfigError, DataError, TrainingError
from minisafe.fastpath import fast_training
from minisafe.freeze import (SCOPES, FreezeSpec, apply_freeze, bias_name, freeze_rows, freeze_table, neuron_count,
                             random_neurons, read_layer_spec)
from minisafe.io import atomic_directory, atomic_write_json, content_hash, read_json, run_record
from minisafe.metrics import response_ids
from minisafe.model import Packed, Transformer
from minisafe.objectives import IGNORE, OBJECTIVES, Head, pair_loss_sum, pair_statistic, sequence_logps, sft_loss_sum
from minisafe.run_folder import (append_log, checkpoint_position, clean_output_dir, output_kind, read_checkpoint,
                                 restore_rng, resumed_record, save_checkpoint, truncate_log)
from minisafe.tokenizer import TEMPLATES, Tokenizer

FIELDS = {"sft": ("prompt", "response"), "dpo": ("prompt", "chosen", "rejected"),
          "unlearn": ("prompt", "chosen", "rejected")}
SCHEDULES = ("cosine", "linear")
# Settings a resumed run may change; the rest must match the run being continued (inputs are compared by hash).
RESUMABLE = ("resume", "max_steps", "save_every", "eval_every", "progress", "command", "device", "model", "data",
             "val_data", "out", "fsdp", "snapshots")

T = TypeVar("T")
Example = tuple[tuple[list[int], list[int]], ...]  # one (ids, labels) sequence for sft; (chosen, rejected) for pairs


@dataclass
class TrainConfig:
    model: str = option(help="Hugging Face model directory (safetensors) to start from")
    data: str = option(help="training data file (jsonl/json/csv; fields as above)")
    out: str = option(help="output directory: the fine-tuned model, run.json, train_log.jsonl, audit.json; must not "
                      "exist unless --resume (a run stopped before its first checkpoint is started again)",
                      type=output_dir)
    objective: str = option("sft",
        "sft: cross-entropy on the response; dpo: preference optimisation against the starting model; unlearn: NLL on "
        "chosen minus --unlearn-weight * NLL on rejected", choices=OBJECTIVES)
    freeze: str | None = option(None,
        "layers to freeze: 'none', FIRST:LAST (0-based, inclusive, e.g. 6:11), or a safety_layers.json written by "
        "locate.py", metavar="SPEC")
    freeze_scope: str = option("attn_mlp",
        "attn_mlp: the attention and MLP tensors of the frozen layers (the paper's code); all: every tensor of those "
        "layers, norms included", choices=SCOPES)
    trainable: str | None = option(None, "only parameters whose name matches REGEX are trainable", metavar="REGEX")
    frozen: str | None = option(None, "also freeze parameters whose name matches REGEX", metavar="REGEX")
    freeze_random_neurons: str | None = option(None,
        "the paper's NFFT control: freeze seeded random output rows (neurons) of the attention and MLP projections, N "
        "parameters or like:SPEC (as many as freezing SPEC's layers would, e.g. like:13:14 or "
        "like:safety_layers.json); combines with the flags above", metavar="N|like:SPEC")
    epochs: int = option(3, "passes over the training data", type=positive_int)
    lr: float = option(1e-4, "peak learning rate (AdamW)", type=positive_float)
    batch_size: int = option(4, "examples per micro-batch, over all processes together", type=positive_int)
    grad_accum: int = option(1,
        "micro-batches per optimizer step (a step sees batch-size * grad-accum examples)", type=positive_int)
    warmup_steps: int = option(100, "steps of linear learning-rate warm-up", type=non_negative_int)
    schedule: str = option("cosine",
        "decay of the learning rate after warm-up, to 0 at the end of the last epoch", choices=SCHEDULES)
    weight_decay: float = option(0.0, "AdamW weight decay (trainable tensors only)", type=non_negative_float)
    grad_clip: float = option(1.0, "clip the gradient norm to this value; 0 = no clipping", type=non_negative_float)
    max_len: int = option(256, "tokens per sequence (prompt + response), cut beyond", type=whole(2))
    max_steps: int | None = option(None,
        "stop after this many optimizer steps (saves the model, audit and a checkpoint to --resume from; the schedule "
        "still spans --epochs)", type=positive_int)
    seed: int = option(0, "seed of the data order and the validation split", type=int)
    dtype: str = option("float32",
        "compute dtype (bfloat16 = autocast; weights and optimizer state stay float32)", choices=DTYPES)
    device: str = option("cpu", "cpu or cuda", type=device_name)
    template: str = option("chat",
        "prompt format: the model's own chat template or the paper's Alpaca template", choices=TEMPLATES)
    loss_on_prompt: bool = option(False, "sft: train on the prompt tokens too (as the paper's script did)")
    beta: float = option(0.1, "dpo: strength of the pull towards the reference", type=positive_float)
    unlearn_weight: float = option(1.0,
        "unlearn: weight of the gradient ascent on the rejected response (unbounded; keep it small)",
        type=non_negative_float)
    val_data: str | None = option(None, "validation data file (same fields as --data)", metavar="F")
    val_fraction: float = option(0.0, "hold out this seeded fraction of --data for validation instead", type=fraction)
    eval_every: int = option(0,
        "validation loss every N steps (0 = at the end only); needs a validation set", type=non_negative_int)
    save_every: int = option(200,
        "training checkpoint every N steps (0 = only at --max-steps and on Ctrl-C)", type=non_negative_int)
    snapshots: tuple[float, ...] = option((),
        "also save the model after these shares of the schedule (e.g. 0.25 0.5) as out/snapshot-STEP/, to measure "
        "how a fine-tune changes the model along the way", type=share, nargs="+", metavar="SHARE")
    resume: bool = option(False,
        "continue the unfinished run in --out from its checkpoint (a run that stopped before its first checkpoint "
        "starts again from step 0)")
    fsdp: bool = option(False,
        "under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of replicating the model on "
        "every process")
    progress: bool = option(True, "hide the progress bar")
    command: list[str] | None = None  # recorded in run.json instead of sys.argv


# ---------------------------------------------------------------- checks before anything is written


def check_config(cfg: TrainConfig) -> None:
    """Every flag value the loop cannot use is a ConfigError naming the flag: each field's own check (as on the
    command line), then the combinations."""
    check_fields(cfg)
    if cfg.val_data and cfg.val_fraction:
        raise ConfigError("give --val-data or --val-fraction, not both")
    if cfg.freeze_random_neurons and cfg.fsdp:
        raise ConfigError("--freeze-random-neurons freezes rows inside tensors, which --fsdp shards: use one of them")


# ---------------------------------------------------------------- the output directory (minisafe.run_folder)


def claim_output_dir(out: Path, resume: bool, ranks: Dist, say: Callable) -> bool:
    """Whether this run continues the checkpoint in out (True) or starts afresh (False), after cleaning up.
    A run that stopped before its first checkpoint starts again from step 0, with or without --resume."""
    kind = output_kind(out)
    if ranks.world > 1:
        dist.barrier()  # every process has looked at the directory before process 0 cleans it
    if resume and kind in ("empty", "taken"):
        raise ConfigError(f"--resume: {out / 'checkpoint' / 'state.json'} not found; there is no unfinished run "
                          f"in {out} to continue")
    if not resume and kind in ("unfinished", "taken"):
        raise ConfigError(f"{out} already exists; choose a new --out, or pass --resume to continue the run saved there")
    if kind == "stuck":
        say(f"note: {out} holds a run that stopped before its first checkpoint; starting it again from step 0")
    if ranks.main and kind != "empty":
        clean_output_dir(out, restart=kind == "stuck")
    return kind == "unfinished"


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


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bfloat16 autocast when the run asks for it (--dtype bfloat16), else a block that changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def micro_loss(model: nn.Module, examples: list[Example], indices: list[int], cfg: TrainConfig,
               reference: Tensor | None, device: torch.device) -> Tensor:
    """The summed loss of some examples, their sequences (chosen ones before rejected ones) in one forward pass."""
    sequences = [examples[i][k] for k in range(len(examples[indices[0]])) for i in indices]
    with autocast(cfg, device):
        hidden, labels, rows = forward_packed(model, sequences, device)
        if cfg.objective == "sft":
            return sft_loss_sum(hidden, labels, output_layer(model))
        values = pair_statistic(cfg.objective, hidden, labels, output_layer(model), rows)
        ref = reference[indices].to(device) if reference is not None else None
        return pair_loss_sum(cfg.objective, values, ref, cfg.beta, cfg.unlearn_weight)


def forward_packed(model: nn.Module, sequences: list[tuple[list[int], list[int]]], device: torch.device
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The last hidden states [1, N, D] of sequences laid end to end, the leading tokens they share laid down once
    (model.Packed, shareable_tokens), their labels [1, N] and the sequence of each position [N] (a shared token's:
    the first sequence's). The output layer runs inside the loss, at labelled positions only (objectives.token_nll).

    No padding reaches the linears, and a batch is one forward pass (several passes of similar lengths would pad
    less, but a matmul of fewer rows runs further from the CPU's peak). A position predicts the packed token after
    it: wherever that token is a target, it is the next token of the same sequence, since shareable_tokens keeps a
    target and the token before it its sequence's own, and a sequence's own tokens follow one another."""
    packed = Packed([ids for ids, _ in sequences], [shareable_tokens(labels) for _, labels in sequences], device)
    # the rows' labels, right-padded; a first token is never a target (no position before it predicts it)
    rows = [[IGNORE] + labels[1:] + [IGNORE] * (packed.width - len(labels)) for _, labels in sequences]
    labels = torch.tensor(rows, device=device).flatten()[packed.tokens_at]
    hidden = model(packed.tokens, skip_head=True, packed=packed)
    return hidden, labels[None], packed.tokens_at // packed.width


def shareable_tokens(labels: list[int]) -> int:
    """How many leading tokens of a sequence may be shared with others (model.Packed): those before the position that
    predicts its first target (position t predicts the token at t + 1), and never its last token."""
    first_target = next((t for t in range(1, len(labels)) if labels[t] != IGNORE), len(labels))
    return first_target - 1


def output_layer(model: nn.Module) -> Head:
    """The head the losses apply at labelled positions: logits left in the activation dtype, since the
    cross-entropy takes them to float32 a chunk at a time (objectives.RowCrossEntropy)."""
    return partial(model.logits, float_logits=False)


def own_rows(batch: list[T], ranks: Dist) -> tuple[list[T], float]:
    """This process's rows of a global micro-batch, and 1.0. A process without rows still runs (FSDP needs every
    process in every forward): on the batch's first row, weighted 0.0."""
    mine = batch[ranks.rank::ranks.world]
    return (mine, 1.0) if mine else (batch[:1], 0.0)


@torch.no_grad()
def reference_logps(model: nn.Module, examples: list[Example], cfg: TrainConfig, ranks: Dist) -> Tensor:
    """[N, 2]: summed log-probabilities of each (chosen, rejected) response under the model as it is now. The
    sequences run sorted by length, 2 x batch_size a pass, so that attention's rows pad little."""
    out = torch.zeros(len(examples), 2)
    sequences = sorted(((i, k) for i in range(len(examples)) for k in (0, 1)),
                       key=lambda seq: len(examples[seq[0]][seq[1]][0]))
    starts = range(0, len(sequences), 2 * cfg.batch_size)
    for start in tqdm(starts, desc="reference log-probs", disable=not (cfg.progress and ranks.main)):
        mine, weight = own_rows(sequences[start:start + 2 * cfg.batch_size], ranks)
        with autocast(cfg, ranks.device):
            hidden, labels, rows = forward_packed(model, [examples[i][k] for i, k in mine], ranks.device)
            logps = sequence_logps(hidden, labels, output_layer(model), rows).cpu()
        if weight:
            out[[i for i, _ in mine], [k for _, k in mine]] = logps
    return sum_across(out.to(ranks.device), ranks).cpu()


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[Example], cfg: TrainConfig, reference: Tensor | None,
                    ranks: Dist) -> float:
    """The objective over the whole validation set, normalised as in training."""
    total = torch.zeros(1, device=ranks.device)
    for start in range(0, len(examples), cfg.batch_size):
        rows, weight = own_rows(list(range(start, min(start + cfg.batch_size, len(examples)))), ranks)
        total += weight * micro_loss(model, examples, rows, cfg, reference, ranks.device).float()
    return sum_across(total, ranks).item() / loss_count(examples, list(range(len(examples))), cfg.objective)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                   examples: list[Example], indices: list[int], lr: float, cfg: TrainConfig, reference: Tensor | None,
                   ranks: Dist) -> tuple[float, float]:
    """One AdamW step on the examples `indices` (all processes together); returns the step's loss and gradient norm."""
    count = loss_count(examples, indices, cfg.objective)
    step_loss = torch.zeros((), device=ranks.device)
    # Autocast keeps its bfloat16 copies of the weights until the outermost block ends: one block around all of the
    # step's passes casts each weight once per step instead of once per pass.
    with autocast(cfg, ranks.device):
        for start in range(0, len(indices), cfg.batch_size):
            rows, weight = own_rows(indices[start:start + cfg.batch_size], ranks)
            loss = micro_loss(model, examples, rows, cfg, reference, ranks.device) * (weight / count)
            loss.backward()
            step_loss += loss.detach()
    if ranks.world > 1 and not cfg.fsdp:
        sum_gradients(params, ranks)  # FSDP has summed them already, during backward
    # With no clipping asked for, max_norm = inf still reports the norm and scales the gradients by exactly 1.
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    # The fused kernel writes the parameters without bumping their version counters, as every other in-place write
    # does; fast_training's bfloat16 copies of the weights are remade when a version moves.
    torch.autograd.graph.increment_version(params)
    # Zeroed, not freed: the gradient buffers stay allocated from step to step (a fresh buffer of this size costs
    # more in page faults than zeroing a resident one), and the next step's gradients are added into them.
    optimizer.zero_grad(set_to_none=False)
    return sum_across(step_loss, ranks).item(), grad_norm.item()


def learning_rate(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up over `warmup` steps, then decay towards 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)


# ---------------------------------------------------------------- optimizer state and run.json


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


def new_record(cfg: TrainConfig, inputs: dict[str, str | None], layers: tuple[int, int] | None, model: Transformer,
               trainable: list[str], world: int) -> dict:
    """run.json of a new run: command, seed, versions, input hashes, settings and the freeze."""
    record = run_record(cfg.seed, inputs, **settings_of(cfg), freeze_layers=layers, trainable_tensors=len(trainable),
                        world_size=world, freeze_table=freeze_rows(model))
    record["command"] = command_line(cfg)
    return record


# ---------------------------------------------------------------- the run: setup, loop, finish


@dataclass
class Run:
    """What setup() builds and the loop and finish() use: the model, the data, the optimizer and the position."""
    out: Path
    ranks: Dist
    model: Transformer
    tok: Tokenizer
    trainable: list[str]
    train_set: list[Example]
    val_set: list[Example]
    start_hashes: dict[str, str]  # of the weights as loaded, to check the audit's base against
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    saved_step: int | None = None  # the step of the checkpoint on disk
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    reference: Tensor | None = None  # dpo: reference log-probs of the training and validation examples
    val_reference: Tensor | None = None
    validated: dict[int, float] = field(default_factory=dict)
    frozen_rows: dict[str, Tensor] = field(default_factory=dict)  # NFFT: tensor name -> its frozen rows
    frozen_values: dict[str, Tensor] = field(default_factory=dict)  # their values as loaded
    loss: float | None = None
    tokens: int = 0
    started: float = 0.0

    @property
    def ckpt(self) -> Path:
        """The run's training checkpoint directory."""
        return self.out / "checkpoint"


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or --resume) one training run; returns a summary. on_step(step) is called after every optimizer step."""
    check_config(cfg)
    out = Path(cfg.out)
    ranks = start_processes(cfg.device)
    say = print if ranks.main else (lambda *a, **k: None)
    try:
        resuming = claim_output_dir(out, cfg.resume, ranks, say)
        run = setup(cfg, out, ranks, resuming, say)
        with fast_training(run.model):
            stopped = loop(run, cfg, on_step)
        return finish(run, cfg, stopped)
    except OSError as e:  # reading the inputs or writing the log: name the file, not a traceback
        raise TrainingError(f"{e.filename or out}: {e.strerror or e}") from None
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def setup(cfg: TrainConfig, out: Path, ranks: Dist, resuming: bool, say: Callable) -> Run:
    """The model (frozen as asked), the data, run.json, the dpo reference and the optimizer; on resume, the state of
    the checkpoint (every file of it checked before anything is written)."""
    torch.manual_seed(cfg.seed)
    model, tok = checkpoint.load(cfg.model, dtype=torch.float32, device=ranks.device)
    spec = FreezeSpec(read_layer_spec(cfg.freeze), cfg.freeze_scope, cfg.trainable, cfg.frozen)
    trainable = apply_freeze(model, spec)
    frozen_rows = freeze_neurons(model, cfg.freeze_random_neurons, cfg.seed, say) if cfg.freeze_random_neurons else {}
    train_set, val_set = training_data(cfg, tok, say)
    inputs = {"model": cfg.model, "data": cfg.data, "val_data": cfg.val_data}
    record = check_resumable(out, cfg, inputs) if resuming else None
    if ranks.world > 1:
        dist.barrier()  # every process has read run.json before process 0 rewrites it
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(train_set) / per_step)
    run = Run(out, ranks, model, tok, trainable, train_set, val_set,
              {name: tensor_sha256(t) for name, t in model.state_dict().items()}, steps_per_epoch,
              cfg.epochs * steps_per_epoch)
    run.frozen_rows = frozen_rows
    run.frozen_values = {name: model.get_parameter(name).detach()[rows].clone() for name, rows in frozen_rows.items()}
    say(freeze_table(model))
    say(f"{len(train_set)} training examples, {len(val_set)} validation; {steps_per_epoch} steps per epoch, "
        f"{run.total_steps} in all; {per_step} examples per step on {ranks.world} process(es)")
    saved = read_saved_state(run, cfg.objective == "dpo") if resuming else None
    if saved:
        model.load_state_dict(saved["model"])
        restore_rng(saved["rng"])
        run.step = run.saved_step = saved["position"]["step"]
        record = resumed_record(record, command_line(cfg), run.step)
    else:
        record = new_record(cfg, inputs, spec.layers, model, trainable, ranks.world) if ranks.main else None
        if record is not None and frozen_rows:
            record["frozen_neurons"] = {"rows": sum(len(r) for n, r in frozen_rows.items() if n.endswith(".weight")),
                                        "parameters": rows_parameters(model, frozen_rows)}
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "run.json", record)
        truncate_log(out / "train_log.jsonl", run.step)
    setup_reference(run, cfg, saved)
    setup_optimizer(run, cfg.lr, cfg.weight_decay, cfg.fsdp, saved)
    return run


def read_saved_state(run: Run, dpo: bool) -> dict:
    """The checkpoint in run.ckpt, checked against this run's model, trainable tensors and (dpo) examples."""
    model_shapes = {name: tuple(t.shape) for name, t in run.model.state_dict().items()}
    trainable_shapes = {name: tuple(p.shape) for name, p in run.model.named_parameters() if p.requires_grad}
    reference_shapes = {}
    if dpo:
        reference_shapes["reference_logps"] = (len(run.train_set), 2)
        if run.val_set:
            reference_shapes["val_reference_logps"] = (len(run.val_set), 2)
    return read_checkpoint(run.ckpt, run.total_steps, model_shapes, trainable_shapes, reference_shapes)


def setup_reference(run: Run, cfg: TrainConfig, saved: dict | None) -> None:
    """dpo: the reference log-probabilities, from the checkpoint or from the model as loaded (that IS the frozen
    reference, so no second copy stays in memory)."""
    if cfg.objective != "dpo":
        return
    if saved:
        run.reference, run.val_reference = saved["reference"]["reference_logps"], saved["reference"].get(
            "val_reference_logps")
        return
    run.reference = reference_logps(run.model, run.train_set, cfg, run.ranks)
    run.val_reference = reference_logps(run.model, run.val_set, cfg, run.ranks) if run.val_set else None


def setup_optimizer(run: Run, lr: float, weight_decay: float, fsdp: bool, saved: dict | None) -> None:
    """Shard the model under FSDP, then AdamW over the trainable parameters (its state from the checkpoint)."""
    if fsdp and run.ranks.world > 1:
        shard_model(run.model, run.ranks)
    run.params = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
    sharded = fsdp and run.ranks.world > 1
    # The fused kernel updates every parameter in one pass; FSDP's sharded parameters take the plain loop.
    run.optimizer = torch.optim.AdamW(run.params.values(), lr=lr, weight_decay=weight_decay, fused=not sharded)
    if saved:
        load_optimizer_tensors(run.optimizer, run.params, saved["optimizer"])


def freeze_neurons(model: Transformer, spec: str, seed: int, say: Callable) -> dict[str, Tensor]:
    """NFFT: draw the random rows (freeze.random_neurons) and zero their gradients; returns {tensor name: rows},
    biases included. restore_frozen_rows undoes what weight decay and the optimizer would still do to them."""
    neurons = random_neurons(model, neuron_count(model, spec), seed)
    params = dict(model.named_parameters())
    rows = {}
    for name, found in neurons.items():
        rows[name] = torch.tensor(found, dtype=torch.long)
        if bias_name(name) in params:
            rows[bias_name(name)] = rows[name]
    for name, index in rows.items():
        params[name].register_hook(lambda grad, index=index: grad.index_fill(0, index.to(grad.device), 0.0))
    say(f"--freeze-random-neurons {spec}: {sum(len(r) for n, r in neurons.items())} rows of {len(neurons)} tensors, "
        f"{rows_parameters(model, rows):,} parameters frozen")
    return rows


def rows_parameters(model: nn.Module, rows: dict[str, Tensor]) -> int:
    """Parameters held by frozen rows (a weight row has as many as the tensor has columns; a bias entry one)."""
    return sum(len(r) * math.prod(model.get_parameter(n).shape[1:]) for n, r in rows.items())


@torch.no_grad()
def restore_frozen_rows(model: nn.Module, rows: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    """Put the frozen rows back to their starting values (their gradient is zero; this also undoes weight decay)."""
    for name, index in rows.items():
        model.get_parameter(name).index_copy_(0, index, values[name])


def loop(run: Run, cfg: TrainConfig, on_step: Callable[[int], None] | None) -> str:
    """Optimizer steps to the end of the schedule, --max-steps or Ctrl-C, with periodic validation and checkpoints;
    returns why it stopped: completed, max_steps or interrupted."""
    stopped = "completed"
    run.started = time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", disable=not (cfg.progress and run.ranks.main))
    with bar, StopRequest() as stop:
        while run.step < run.total_steps:
            if cfg.max_steps is not None and run.step >= cfg.max_steps:
                stopped = "max_steps"
                break
            entry = train_step(run, cfg)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tok_per_s']:.0f}")
            bar.update(1)
            if run.val_set and cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total_steps:
                validate(run, cfg)
            if on_step is not None:
                on_step(run.step)
            if stop.agreed(run.ranks):
                stopped = "interrupted"
                break
            if run.step in snapshot_steps(cfg.snapshots, run.total_steps):
                save_snapshot(run, cfg)
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.total_steps:
                save_training_checkpoint(run, cfg)
    return stopped


def train_step(run: Run, cfg: TrainConfig) -> dict:
    """Optimizer step run.step + 1 on its examples of the epoch's order; returns (and logs) its log entry."""
    per_step = cfg.batch_size * cfg.grad_accum
    epoch, within = divmod(run.step, run.steps_per_epoch)
    indices = epoch_order(len(run.train_set), cfg.seed, epoch)[within * per_step:(within + 1) * per_step]
    tokens = sum(len(ids) for i in indices for ids, _ in run.train_set[i])
    lr = learning_rate(run.step, run.total_steps, cfg.warmup_steps, cfg.lr, cfg.schedule)
    t0 = time.perf_counter()
    loss, grad_norm = optimizer_step(run.model, run.optimizer, list(run.params.values()), run.train_set, indices, lr,
                                     cfg, run.reference, run.ranks)
    restore_frozen_rows(run.model, run.frozen_rows, run.frozen_values)
    run.step += 1
    seconds = time.perf_counter() - t0
    check_finite(run.step, loss, grad_norm, run.ckpt, run.saved_step)
    run.loss, run.tokens = loss, run.tokens + tokens
    entry = {"step": run.step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
             "tok_per_s": tokens / seconds, "elapsed_s": time.perf_counter() - run.started}
    if run.ranks.main:
        append_log(run.out / "train_log.jsonl", entry)
    return entry


def check_finite(step: int, loss: float, grad_norm: float, ckpt: Path, saved_step: int | None) -> None:
    """Stop at the first step whose loss or gradient norm is not a finite number; nothing of that run is saved."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = f"the checkpoint of step {saved_step} in {ckpt} is kept" if saved_step is not None else "nothing was saved"
    raise TrainingError(f"step {step}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; training "
                        f"stopped and {kept} (a lower --lr or --unlearn-weight, or --grad-clip, may help)")


def validate(run: Run, cfg: TrainConfig) -> float:
    """The validation loss at run.step, logged; computed once per step (the end of a run may coincide with a
    periodic validation)."""
    if run.step not in run.validated:
        run.validated[run.step] = validation_loss(run.model, run.val_set, cfg, run.val_reference, run.ranks)
        if run.ranks.main:
            append_log(run.out / "train_log.jsonl", {"step": run.step, "val_loss": run.validated[run.step]})
    return run.validated[run.step]


def save_training_checkpoint(run: Run, cfg: TrainConfig) -> None:
    """checkpoint/ at run.step, to --resume from (every process gathers; process 0 writes)."""
    state, opt_state = full_state(run.model), optimizer_tensors(run.optimizer, run.params)  # collectives under FSDP
    references = {k: v for k, v in (("reference_logps", run.reference), ("val_reference_logps", run.val_reference))
                  if v is not None}
    if run.ranks.main:
        save_checkpoint(run.ckpt, state, opt_state, references,
                        checkpoint_position(run.step, run.steps_per_epoch, run.total_steps, cfg.schedule,
                                            cfg.warmup_steps))
    run.saved_step = run.step


def snapshot_steps(shares: tuple[float, ...], total_steps: int) -> set[int]:
    """The steps after which --snapshots saves the model: each share of the schedule, at least step 1."""
    return {max(1, round(share * total_steps)) for share in shares}


def save_snapshot(run: Run, cfg: TrainConfig) -> None:
    """The model as it is after run.step, as an ordinary model directory out/snapshot-<step>/ (not audited)."""
    state = full_state(run.model)
    if run.ranks.main:
        with atomic_directory(run.out / f"snapshot-{run.step}") as tmp:
            checkpoint.save(plain_model(run.model, state, cfg.fsdp and run.ranks.world > 1), run.tok, tmp)


def finish(run: Run, cfg: TrainConfig, stopped: str) -> dict:
    """A checkpoint unless the schedule completed; then, unless interrupted, the validation loss, audit.json and the
    model files; returns the run's summary."""
    seconds = time.perf_counter() - run.started
    summary = {"stopped": stopped, "step": run.step, "total_steps": run.total_steps, "loss": run.loss,
               "tokens": run.tokens, "seconds": seconds, "tok_per_s": run.tokens / seconds if seconds else None,
               "trainable_parameters": sum(p.numel() for p in run.params.values()), "out": str(run.out),
               "main": run.ranks.main}
    if stopped != "completed":
        if run.saved_step != run.step:  # not when the loop has just saved this very step
            save_training_checkpoint(run, cfg)
        summary["checkpoint"] = str(run.ckpt)
        if stopped == "interrupted":
            return summary
    if run.val_set:
        summary["val_loss"] = validate(run, cfg)
    state = full_state(run.model)
    if run.ranks.main:
        frozen_rows = {name: rows.tolist() for name, rows in run.frozen_rows.items()}
        audit = audit_run(cfg.model, state, set(run.trainable), run.start_hashes, frozen_rows)
        audit.update(model=cfg.model, freeze=cfg.freeze, freeze_scope=cfg.freeze_scope, trainable_regex=cfg.trainable,
                     frozen_regex=cfg.frozen, freeze_random_neurons=cfg.freeze_random_neurons)
        write_final(run.out, plain_model(run.model, state, cfg.fsdp and run.ranks.world > 1), run.tok, audit)
        summary["audit"] = audit["summary"]
        if stopped == "completed" and run.ckpt.exists():
            shutil.rmtree(run.ckpt)
    if run.ranks.world > 1:
        dist.barrier()  # the files are complete before any process returns
    return summary


def plain_model(model: Transformer, state: dict[str, Tensor], sharded: bool) -> Transformer:
    """The model to save: itself, or under FSDP (where it holds shards) a plain model around the gathered weights."""
    if not sharded:
        return model
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(state, assign=True)
    return plain


def write_final(out: Path, model: Transformer, tok: Tokenizer, audit: dict) -> None:
    """The model files and audit.json into out/ (beside the run's other files), after the frozen-tensor check. The
    model is written in full before audit.json and before any file of it appears, so a failed write (disk full)
    leaves no result that looks finished."""
    staging = out / ".model.partial"
    try:
        checkpoint.save(model, tok, staging)
        atomic_write_json(out / "audit.json", audit)
        verify_audit(audit)
        for file in staging.iterdir():  # each file is replaced atomically; the run's other files stay
            os.replace(file, out / file.name)
    except OSError as e:
        ckpt = out / "checkpoint"
        kept = f"the checkpoint in {ckpt} is kept" if ckpt.is_dir() else "there is no checkpoint to resume from"
        raise TrainingError(f"{out}: cannot write the trained model ({e.strerror or e}); {kept}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
