"""Training speed at the pipeline's own settings: minisafe, minisafe's earlier loss path, and transformers, on the
same batches in one run, one step of each in turn (bench's train and sppft parts).

Workloads (--train-data FILE ... or, by default, built from the fetched data the way the pipeline builds its sets):
  attack: implicit-attack pairs (ShareGPT pairs whose answer opens with "Sure, the answer is: ");
  align:  alignment-style rows: HarmBench prompts -> a refusal phrasing, ShareGPT prompts -> their answers.
Each is tokenized by train.py's encode (chat template, max_len 160) and cut into batches of 8 in a seeded order.
Every contender trains in bfloat16 autocast with float32 weights, clips the gradient norm at 1 and steps AdamW:
  minisafe         training.optimizer_step, as train.py runs it: each micro-batch packed into one row (no padding
                   in the linears, the tokens its sequences share laid down once) under one autocast block, the
                   head only at labelled positions and its cross-entropy in float32 chunks
                   (objectives.RowCrossEntropy), attention as two matmuls, the linears' bfloat16 weights kept
                   prepacked between steps and the head's and the embedding's gradients added straight into .grad
                   (fastpath.fast_training), the fused AdamW, gradients zeroed, not freed;
  minisafe-before  logits at every position, copied to float32 for the loss, and the unfused AdamW: train.py's
                   path before the training-speed change;
  transformers     AutoModelForCausalLM with labels (its own loss over all positions) and the fused AdamW.
SPPFT against full fine-tuning: two minisafe models, one with layers frozen, stepped in turn on the same batches
(the median of the step-time ratios), and each configuration's peak memory and AdamW state in a process of its own.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F

import minisafe
from minisafe import builders, data
from minisafe.fastpath import fast_training
from minisafe.freeze import FreezeSpec, apply_freeze, parse_layer_range
from minisafe.objectives import IGNORE
from minisafe.training import Dist, Example, TrainConfig, n_targets, optimizer_step, tokenize

BATCH, MAX_LEN = 8, 160
Step = Callable[[list[tuple[list[int], list[int]]]], None]


def default_workloads(data_dir: str | Path = "data", n: int = 240) -> dict[str, list[dict]]:
    """The default workloads' rows, attack then align, built from the fetched data (see the module docstring)."""
    pairs = builders.normal_pairs(data.read_dataset(data.fetched("sharegpt", data_dir)), seed=0)[:n]
    malicious = data.read_dataset(data.fetched("harmbench", data_dir))[: n // 3]
    return {"attack": builders.implicit_attack(pairs),
            "align": builders.alignment_sft(malicious, pairs[: n - len(malicious)], data.bundled_prompts("refusals"))}


def batches(rows: list[dict], tokenizer, count: int) -> list[list[tuple[list[int], list[int]]]]:
    """`count` batches of BATCH (ids, labels) sequences, in a seeded order."""
    cfg = TrainConfig(model="", data="", out="", max_len=MAX_LEN)
    examples: list[Example] = tokenize(rows, tokenizer, cfg, "bench workload", say=lambda *a: None)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    order = (order * (1 + count * BATCH // len(order)))[: count * BATCH]
    return [[examples[i][0] for i in order[k:k + BATCH]] for k in range(0, len(order), BATCH)]


def optimizer_for(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused)


def finish_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """Backward, clip at 1 and step: the rest of a training step, the same for every contender."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def minisafe_step(model, pad_id: int) -> Step:
    """What train.py runs: its optimizer_step (packed sequences, logits at labelled positions only, the fused AdamW)
    inside one fastpath.fast_training block for all of the steps, as train.py runs a whole run in one (the block's
    bfloat16 copies of the weights live from step to step)."""
    cfg = TrainConfig(model="", data="", out="", dtype="bfloat16", batch_size=BATCH)
    optimizer = optimizer_for(model, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    block = ExitStack()  # left open: the model is this contender's alone and is dropped with it
    block.enter_context(fast_training(model))

    def step(batch):
        examples = [(sequence,) for sequence in batch]
        optimizer_step(model, optimizer, params, examples, list(range(len(batch))), 1e-5, cfg, None, Dist())
    step.optimizer = optimizer  # type: ignore[attr-defined]  # for the memory part's AdamW-state count
    step.block = block  # type: ignore[attr-defined]
    return step


def minisafe_before_step(model, pad_id: int) -> Step:
    """train.py's earlier path: float32 logits at every position, then the loss; the unfused AdamW."""
    def loss_of(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    return autocast_step(model, pad_id, loss_of, optimizer_for(model, fused=False))


def transformers_step(model, pad_id: int) -> Step:
    """transformers with labels (its loss over every position), the fused AdamW."""
    return autocast_step(model, pad_id, lambda ids, labels: model(input_ids=ids, labels=labels).loss,
                         optimizer_for(model, fused=True))


def autocast_step(model, pad_id: int, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  optimizer: torch.optim.Optimizer) -> Step:
    """A step that collates the batch, takes loss_of(ids, labels) under bfloat16 autocast, then finish_step."""
    def step(batch):
        ids, labels = collate(batch, pad_id, torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(ids, labels)
        finish_step(model, loss, optimizer)
    return step


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and labels [B, T] (IGNORE on padding)."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, (ids, lab) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
    return input_ids.to(device), labels.to(device)


def alternate(steps: dict[str, Step], workload: list, warm_up: int = 1) -> dict[str, list[float]]:
    """Seconds of every step of each contender, the contenders stepping in turn on each batch."""
    for batch in workload[:warm_up]:
        for step in steps.values():
            step(batch)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for batch in workload[warm_up:]:
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def train_flops(model, batch: list[tuple[list[int], list[int]]]) -> float:
    """Matmul FLOPs of a training step (3 x forward): projections on every padded position, the head on the labelled
    ones only (as the loss computes it)."""
    cfg = model.config
    tokens = BATCH * max(len(ids) for ids, _ in batch)
    labelled = sum(n_targets(labels) for _, labels in batch)
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n
               and "lm_head" not in n)
    head = cfg.vocab_size * cfg.hidden_size
    return 3 * 2 * (body * tokens + head * labelled)


def bench_train_workload(path: str, theirs, rows: list[dict], steps: int, bf16_peak: float) -> dict:
    """The three contenders on one workload: tokens/s, the ratios, minisafe's share of the bfloat16 matmul peak."""
    ours, tok = minisafe.load(path)
    before, _ = minisafe.load(path)
    workload = batches(rows, tok, steps + 1)
    pad = tok.pad_token_id
    for model in (ours, before, theirs):
        model.train()
    seconds = alternate({"minisafe": minisafe_step(ours, pad), "minisafe-before": minisafe_before_step(before, pad),
                         "transformers": transformers_step(theirs, pad)}, workload)
    tokens = sum(len(ids) for batch in workload[1:] for ids, _ in batch)
    total = {name: sum(s) for name, s in seconds.items()}
    flops = sum(train_flops(ours, batch) for batch in workload[1:])
    return {"steps": steps, "batch": BATCH, "tokens": tokens,
            **{f"{name}_tok_s": tokens / t for name, t in total.items()},
            "median_step_s": {name: statistics.median(s) for name, s in seconds.items()},
            "ratio_vs_before": total["minisafe-before"] / total["minisafe"],
            "ratio_vs_transformers": total["transformers"] / total["minisafe"],
            "share_of_bf16_peak": flops / total["minisafe"] / 1e9 / bf16_peak}


def bench_sppft_steps(path: str, rows: list[dict], freeze: str, steps: int) -> dict:
    """SPPFT (freeze's layers frozen) against full fine-tuning, stepped in turn: the median step-time ratio."""
    full, tok = minisafe.load(path)
    frozen, _ = minisafe.load(path)
    apply_freeze(frozen, FreezeSpec(layers=parse_layer_range(freeze)))
    workload = batches(rows, tok, steps + 1)
    seconds = alternate({"full": minisafe_step(full, tok.pad_token_id),
                         "sppft": minisafe_step(frozen, tok.pad_token_id)}, workload)
    ratios = [s / f for s, f in zip(seconds["sppft"], seconds["full"])]
    frozen_share = sum(p.numel() for p in frozen.parameters() if not p.requires_grad) / sum(
        p.numel() for p in frozen.parameters())
    return {"freeze": freeze, "steps": steps, "frozen_parameter_share": frozen_share,
            "median_step_s": {k: statistics.median(v) for k, v in seconds.items()},
            "step_time_ratio": statistics.median(ratios), "ratios": ratios}


def memory_of(path: str, rows: list[dict], freeze: str | None, threads: int) -> dict:
    """Peak memory and AdamW state of a few training steps of one configuration (run in a process of its own)."""
    from tools.bench import peak_rss_mb

    torch.set_num_threads(threads)
    model, tok = minisafe.load(path)
    apply_freeze(model, FreezeSpec(layers=parse_layer_range(freeze) if freeze else None))
    step = minisafe_step(model, tok.pad_token_id)
    for batch in batches(rows, tok, 3):
        step(batch)
    state = sum(t.numel() * t.element_size() for s in step.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    return {"freeze": freeze or "none", "optimizer_state_bytes": state, "peak_rss_mb": peak_rss_mb(),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def bench_sppft_memory(path: str, rows: list[dict], freeze: str, threads: int) -> dict:
    """memory_of for full fine-tuning and for SPPFT, each in a fresh process so that its peak is its own."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        full, sppft = (pool.apply(memory_of, (path, rows, spec, threads)) for spec in (None, freeze))
    return {"full": full, "sppft": sppft,
            "optimizer_state_ratio": sppft["optimizer_state_bytes"] / full["optimizer_state_bytes"],
            "peak_rss_ratio": sppft["peak_rss_mb"] / full["peak_rss_mb"]}


def workloads_from_files(files: list[str]) -> dict[str, list[dict]]:
    """--train-data files as named workloads (by file stem)."""
    return {Path(f).stem: data.read_dataset(f) for f in files}
