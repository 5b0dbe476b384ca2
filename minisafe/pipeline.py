"""The main job end to end (`make demo`, `make reproduce`): align a bundled model, locate its safety layers, attack
it with and without SPPFT, evaluate every checkpoint, and write a report laid out like the paper's.

    python -m minisafe.pipeline --profile quick --out runs/demo

Steps, in order (each writes one directory under --out):
  data/          every set, cut by minisafe.splits: test splits first, then validation splits (the alignment sweep's),
                 then the pools that alignment and attacks draw from; no prompt is in two of them
  align_data/    the alignment data of the profile's Recipe (minisafe.alignment), with the unaligned model's own
                 greedy answers (cached in answers.jsonl) as the targets of normal and over-rejection prompts
  align/         safety SFT of the unaligned model; align_dpo/ its DPO stage, when the recipe has one
  eval-original/, eval-aligned/   both models on every test split (HarmBench, Do-Not-Answer, reformulated requests,
                 ShareGPT, over-rejection)
  locate/        locate.py on the aligned model; locate_base/ the cosine analysis of the unaligned original
  attack-<attack>-<method>[-lr<scale>][-x<factor>]-s<seed>/   fine-tunes of the aligned model (attack_runs): each
                 attack set, learning rate, method (full, sppft, nfft, random, before, after; the frozen-share sweep's
                 sppft-wN and random-wN) and seed; the dose-response runs keep snapshots part-way, and the longer
                 runs (-x<factor>: that many times the epochs) give the dose curves' last point
  eval-*/, dose-*/   eval.py on every fine-tune and on its snapshots (R_h only), on held-out prompts only
  report.md      minisafe.pipeline_report: the verdicts, the alignment table, the localisation, the Table 2 layout
                 with bootstrap intervals and paired differences, dose-response, frozen-share sweep, wall times

Resuming: every step records in step.json the hashes of its inputs and its settings; a rerun skips a step whose
record matches and redoes one whose inputs or settings changed (and everything downstream of it, since their
inputs then change too). An interrupted fine-tune continues from its training checkpoint.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from minisafe import builders, data
from minisafe.alignment import ANSWER_DTYPE, Recipe, alignment_data, answers_key, greedy_answerer
from minisafe.cli import non_negative_int, option, parse_config, script
from minisafe.errors import ConfigError
from minisafe.evaluation import RESULTS_FORMAT, EvalConfig, run_eval
from minisafe.freeze import parse_layer_range
from minisafe.io import atomic_write_json, atomic_write_text, content_hash, machine, read_json, run_record
from minisafe.locating import LocateConfig, run_locate
from minisafe.pipeline_report import alignment_report, demo_report
from minisafe.splits import SPLITS, Splits, build_sets
from minisafe.training import TrainConfig, train

# no freezing, the safety layers, the paper's NFFT control (as many random neurons), as many random layers off the
# safety layers, as many layers right before / after them (the paper's ablation)
METHODS = ("full", "sppft", "nfft", "random", "before", "after")
# the methods run again at the other learning rates and twice as long: SPPFT and the controls it must beat
SCALED_METHODS = ("full", "sppft", "nfft", "random")
# The alignment recipe both profiles use: the one the alignment sweep (minisafe.sweep, `make sweep-align`) chose by its
# fixed rule on validation splits only (the last recipes in runs/sweep-q); its table and the bounds it misses are in
# docs/results.md.
RECIPE = Recipe(normal_targets="reference", epochs=3, dpo_epochs=1, dpo_balance=True, normal_questions=0.75,
                styled=0.25)


@dataclass(frozen=True)
class Profile:
    """Every size and setting of one run of the pipeline."""

    name: str
    recipe: Recipe  # how the unaligned model is aligned (minisafe.alignment)
    # locate
    locate_prompts: int  # P = Q
    locate_over_rejection: int  # over-rejection prompts used by the scaling search
    locate_initial: str | None  # FIRST:LAST to start the search from instead of the gap curve's range (None = curve)
    # attacks
    attacks: tuple[str, ...]
    attack_pairs: int
    attack_epochs: int
    attack_lr: float
    harmful_p: float
    methods: tuple[str, ...]  # of METHODS
    seeds: tuple[int, ...]  # every (attack, method) is fine-tuned once per seed: data order, NFFT and random draws
    dose: tuple[float, ...]  # shares of an attack's steps after which R_h is also measured (dose-response)
    dose_seeds: int  # how many of the seeds get the dose-response measurements
    attack_lr_scales: tuple[float, ...]  # learning rates (x attack_lr); scales other than 1 run SCALED_METHODS only
    long_factor: int  # > 1: the first seed's runs again with this many times the epochs (the dose curves' last point)
    share_widths: tuple[int, ...]  # frozen-share sweep on the first attack: this many layers around / at random
    # evaluation
    eval_limit: int | None  # prompts per evaluation set (a seeded sample; None = all)
    eval_tokens: int
    # shared
    batch_size: int = 8
    max_len: int = 256
    seed: int = 0
    splits: Splits = SPLITS


PROFILES = {
    "quick": Profile("quick", RECIPE, locate_prompts=64, locate_over_rejection=64, locate_initial=None,
                     attacks=("implicit",), attack_pairs=32, attack_epochs=2, attack_lr=1e-4, harmful_p=0.1,
                     methods=("full", "sppft", "nfft", "random"), seeds=(0, 1), dose=(0.25, 0.5), dose_seeds=1,
                     attack_lr_scales=(1.0,), long_factor=0, share_widths=(), eval_limit=50, eval_tokens=64,
                     max_len=160),
    # Sized to finish within one working session of two cores, since a run's outputs do not outlive the session
    # that made them: one attack, D_N (the mission's own, ordinary fine-tuning on harmless data; the quick profile
    # has D_I), with every control, three seeds, a tenth of the learning rate, the longer runs, and a frozen-share
    # sweep of two widths besides the located layers' own. The other attack sets are built either way: add them to
    # `attacks` (and widths to `share_widths`) where a run can take longer.
    "full": Profile("full", RECIPE, locate_prompts=100, locate_over_rejection=128, locate_initial=None,
                    attacks=("normal",), attack_pairs=32, attack_epochs=2,
                    attack_lr=1e-4, harmful_p=0.1, methods=METHODS, seeds=(0, 1, 2), dose=(0.25, 0.5), dose_seeds=3,
                    attack_lr_scales=(1.0, 0.1), long_factor=2, share_widths=(4, 16), eval_limit=100,
                    eval_tokens=64, max_len=160),
}


# ---------------------------------------------------------------- resumable steps

# The profile fields each step depends on: changing one reruns that step (and, through its outputs, later ones).
STEP_FIELDS = {
    "data": ("seed", "attack_pairs", "locate_over_rejection", "splits"),
    "align": ("seed", "batch_size", "max_len"),
    "locate": ("seed", "locate_prompts", "locate_initial"),
    "harmful_data": ("seed", "harmful_p"),
    "attack": ("seed", "attack_epochs", "attack_lr", "batch_size", "max_len"),
    "eval": ("seed", "eval_limit", "eval_tokens"),
}
# An evaluation of R_h only (dose-response): the fields of "eval", but no utility rows, so no results format.
STEP_FIELDS["rates"] = STEP_FIELDS["eval"]


# What the code decides about a step's output (a format later readers need, the dtype answers are made in): a step
# made by code that decided otherwise reruns.
STEP_FORMATS = {"eval": {"results_format": RESULTS_FORMAT}, "harmful_data": {"answer_dtype": ANSWER_DTYPE}}


def step_settings(p: Profile, step: str, **extra: Any) -> dict[str, Any]:
    value = lambda name: asdict(getattr(p, name)) if name == "splits" else getattr(p, name)  # noqa: E731
    return {**{name: value(name) for name in STEP_FIELDS[step]}, **STEP_FORMATS.get(step, {}), **extra}


def step_input_hash(path: str | Path) -> str:
    """sha256 over every file below path (names and contents), leaving out step records and training checkpoints,
    which say how an output was made, not what it is."""
    return content_hash(path, suffixes=None, recursive=True, exclude=("step.json", "checkpoint"))


class NotFinished(Exception):
    """A step looked at without running it (run_step with work=None) is missing or out of date."""


def run_step(name: str, out: Path, inputs: dict[str, str | Path], settings: dict[str, Any],
             work: Callable[[Path], None] | None, say: Callable[[str], None] = print) -> dict:
    """Run work(out) unless out/step.json records the same input hashes and settings; returns the step record.
    work=None only looks: the record of an up-to-date step, else NotFinished, and nothing on disk changes."""
    done = read_json(out / "step.json")
    if done is None and work is None:
        raise NotFinished(f"{out}: not run")
    record = {"step": name, "inputs": {k: step_input_hash(v) for k, v in inputs.items()}, "settings": settings}
    if done and {k: done.get(k) for k in record} == record:
        say(f"[{name}] up to date ({done['seconds']:.0f} s when it ran); skipped")
        return done
    if work is None:
        raise NotFinished(f"{out}: out of date")
    # An interrupted fine-tune of the same inputs and settings resumes from its checkpoint; anything else that is
    # there is stale or half-made, and goes.
    pending = out.with_name(f".{out.name}.pending.json")  # beside, not in: train.py wants an empty directory
    prior = read_json(pending) or {}
    resumable = (out / "checkpoint").is_dir() and {k: prior.get(k) for k in record} == record
    if out.exists() and not resumable:
        shutil.rmtree(out)
    say(f"[{name}] {'resuming' if resumable else 'running'}")
    earlier = prior.get("seconds", 0.0) if resumable else 0.0  # spent by the invocations that were interrupted
    atomic_write_json(pending, {**record, "seconds": earlier})
    start = time.perf_counter()
    try:
        work(out)
    except BaseException:
        atomic_write_json(pending, {**record, "seconds": round(earlier + time.perf_counter() - start, 1)})
        raise
    record["seconds"] = round(earlier + time.perf_counter() - start, 1)
    record["machine"] = "{cpu}, {cores} cores".format(**machine())  # not a key of the match above: wall time only
    atomic_write_json(out / "step.json", record)
    pending.unlink()
    say(f"[{name}] done in {record['seconds']:.0f} s")
    return record


# ---------------------------------------------------------------- the sets


def data_step(p: Profile, data_dir: Path, out: Path, say: Callable[[str], None]) -> dict:
    """build_sets as a resumable step: rerun when a source file, a bundled prompt file it reads or a split setting
    changes (only those files: the judge labels beside them are no input of the sets)."""
    inputs: dict[str, Path] = {name: data_dir / f"{name}.jsonl" for name in ("harmbench", "donotanswer", "sharegpt")}
    inputs |= {name: data.PROMPTS_DIR / f"{name}.txt" for name in ("over_rejection", "normal")}
    return run_step("data", out, inputs, step_settings(p, "data"),
                    lambda o: build_sets(data_dir, o, p.splits, p.seed, p.attack_pairs, p.locate_over_rejection), say)


def harmful_answers(model_dir: str, sets: Path, p: Profile, out: Path) -> None:
    """The harmful mix: attack pairs plus p * N malicious train prompts answered by the unaligned model."""
    normal = data.read_jsonl(sets / "attack_normal.jsonl")
    malicious = data.read_jsonl(sets / "align_harmbench.jsonl")
    answer = greedy_answerer(model_dir)
    rows = builders.harmful_mix(normal, malicious, p.harmful_p, lambda prompts: answer(prompts, 128),
                                out / "answers_cache.jsonl", answers_key(model_dir, 128), seed=p.seed)
    builders.write_dataset(out / "attack_harmful.jsonl", rows, builder="harmful_mix", seed=p.seed,
                           sources=[sets / "attack_normal.jsonl", sets / "align_harmbench.jsonl"],
                           params={"p": p.harmful_p})


def write_alignment_data(recipe: Recipe, model_dir: Path, sets: Path, seed: int, out: Path,
                         cache: Path | None = None) -> None:
    """align_sft.jsonl (and align_dpo.jsonl for a recipe with a DPO stage); the model's own answers are cached in
    `cache` (default: out/answers.jsonl)."""
    made = alignment_data(sets, recipe, model_dir, cache or out / "answers.jsonl", seed)
    sources = sorted(sets.glob("*.jsonl"))
    builders.write_dataset(out / "align_sft.jsonl", made.sft, builder="alignment.alignment_data (sft)", seed=seed,
                           sources=sources, params=recipe.settings())
    if made.dpo:
        builders.write_dataset(out / "align_dpo.jsonl", made.dpo, builder="alignment.alignment_data (dpo)",
                               seed=seed, sources=sources, params=recipe.settings())


def align_steps(recipe: Recipe, model_dir: Path, sets: Path, out: Path, p: Profile, say: Callable[[str], None],
                cache: Path | None = None, look_only: bool = False) -> tuple[Path, dict[str, dict]]:
    """Alignment data, SFT and the optional DPO stage as resumable steps under out/; returns the aligned model.
    look_only: run nothing (NotFinished unless every step is up to date; see run_step)."""
    steps = {}
    settings = {**recipe.settings(), "seed": p.seed, "batch_size": p.batch_size, "max_len": p.max_len,
                "answer_dtype": ANSWER_DTYPE}
    made = out / "align_data"
    inputs = {"model": model_dir, "sets": sets, "refusals": data.PROMPTS_DIR / "refusals.txt"}
    work = lambda run: None if look_only else run  # noqa: E731
    steps["align_data"] = run_step("align_data", made, inputs, settings,
                                   work(lambda o: write_alignment_data(recipe, model_dir, sets, p.seed, o, cache)), say)
    steps["align"] = run_step("align", out / "align", {"model": model_dir, "data": made / "align_sft.jsonl"}, settings,
                              work(lambda o: fine_tune(model_dir, made / "align_sft.jsonl", o, p, recipe.epochs,
                                                       recipe.lr, None)), say)
    if not recipe.dpo_epochs:
        return out / "align", steps
    steps["align_dpo"] = run_step(
        "align_dpo", out / "align_dpo", {"model": out / "align", "data": made / "align_dpo.jsonl"}, settings,
        work(lambda o: fine_tune(out / "align", made / "align_dpo.jsonl", o, p, recipe.dpo_epochs, recipe.dpo_lr,
                                 None, "dpo", beta=recipe.dpo_beta)), say)
    return out / "align_dpo", steps


# ---------------------------------------------------------------- training, locating, evaluating


# A training checkpoint (weights and AdamW state) takes seconds to write; a crash loses at most this many steps.
SAVE_EVERY = 100


def fine_tune(model_dir: str | Path, data_file: Path, out: Path, p: Profile, epochs: int, lr: float,
              freeze: str | None, objective: str = "sft", beta: float = 0.1, seed: int | None = None,
              neurons: str | None = None, snapshots: tuple[float, ...] = ()) -> None:
    cfg = TrainConfig(model=str(model_dir), data=str(data_file), out=str(out), objective=objective, freeze=freeze,
                      freeze_random_neurons=neurons, epochs=epochs, lr=lr, beta=beta, batch_size=p.batch_size,
                      warmup_steps=5, max_len=p.max_len, seed=p.seed if seed is None else seed, dtype="bfloat16",
                      template="chat", save_every=SAVE_EVERY, snapshots=tuple(snapshots),
                      resume=(out / "checkpoint").is_dir(), progress=False,
                      command=["python", "-m", "minisafe.pipeline", "--profile", p.name])
    summary = train_in_segments(cfg)
    if summary["stopped"] != "completed":  # Ctrl-C: the checkpoint is saved; the step must not count as done
        raise KeyboardInterrupt(f"{out}: training stopped at step {summary['step']}; rerun to continue")


# Steps a fine-tune's process trains before a fresh one resumes from its checkpoint (see train_in_segments).
SEGMENT = 200


def train_in_segments(cfg: TrainConfig) -> dict:
    """train(cfg) in child processes of SEGMENT steps each, each resuming from the checkpoint of the one before
    (bit-identical to one run, as every resume); once the run's length is known, a segment that would leave at most
    half a segment goes on to the end. Returns the last summary; one that did not stop at its segment's end
    (completed, Ctrl-C) ends the run.

    A process's steps slow down as it ages, more the longer it has trained, whatever oneDNN's kernel cache holds
    (minisafe/__init__.py), while a process resumed from a checkpoint starts fast again. A restart costs setup, the
    checkpoint read back and a slow first step: restarting every SAVE_EVERY steps cost as much as it saved, so a
    run restarts only after the slowdown has grown larger than that."""
    done = read_json(Path(cfg.out) / "checkpoint" / "state.json")["step"] if cfg.resume else 0
    summary = train_in_child(replace(cfg, max_steps=done + SEGMENT))
    while summary["stopped"] == "max_steps":
        left = summary["total_steps"] - summary["step"]
        stop = None if left <= SEGMENT * 3 // 2 else summary["step"] + SEGMENT
        summary = train_in_child(replace(cfg, resume=True, max_steps=stop))
    return summary


def train_in_child(cfg: TrainConfig) -> dict:
    """train(cfg) in a fresh Python process with this one's torch thread count, so that each fine-tune starts on a
    fresh heap; Ctrl-C reaches both processes: the child saves its checkpoint and returns 'interrupted' before this
    one goes on. The process is forked from a server that has imported this module (and so torch) once, so that no
    fine-tune imports torch again; the server only imports, so a child starts with no threads, as a spawned one would."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["minisafe.pipeline"])
    with ProcessPoolExecutor(1, context, initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),)) as child:
        summary = child.submit(train, cfg)
        while True:
            try:
                return summary.result()
            except KeyboardInterrupt:
                continue  # the child is saving its checkpoint; its summary says it stopped


def locate_step(model_dir: str | Path, sets: Path, p: Profile, out: Path, scaling: bool) -> None:
    """locate.py on one model: chat template, centred cosines; the scaling search only with `scaling`."""
    run_locate(LocateConfig(model=str(model_dir), out=str(out), normal=str(sets / "normal_cosine.jsonl"),
                            malicious=str(sets / "malicious_test.jsonl"),
                            over_rejection=str(sets / "over_rejection_locate.jsonl"), n_prompts=p.locate_prompts,
                            template="chat", center=True, skip_scaling=not scaling, seed=p.seed,
                            initial=parse_layer_range(p.locate_initial) if p.locate_initial and scaling else None))


# Malicious sets beyond HarmBench on which the unaligned and the aligned model are scored (each its own eval run).
EXTRA_MALICIOUS = ("dna_test", "dna_other_test", "reformulated_test")


def evaluate_step(model_dir: str | Path, p: Profile, out: Path, harmful: Path, over_rejection: Path | None = None,
                  utility: Path | None = None) -> None:
    """eval.py on one model: greedy, chat template, bfloat16 (faster, and what the pipeline trains in)."""
    run_eval(EvalConfig(models=[str(model_dir)], out=str(out), harmful=str(harmful),
                        over_rejection=str(over_rejection or "none"), utility=str(utility or "none"),
                        max_new_tokens=p.eval_tokens, limit=p.eval_limit, batch_size=50, template="chat",
                        dtype="bfloat16", seed=p.seed, progress=False,
                        command=["python", "-m", "minisafe.pipeline", "--profile", p.name]))


def evaluate_tests(model_dir: str | Path, sets: Path, p: Profile, out: Path, extra: bool) -> None:
    """The test splits: HarmBench, over-rejection and utility in out/; with extra, EXTRA_MALICIOUS in out/<set>/."""
    evaluate_step(model_dir, p, out, sets / "malicious_test.jsonl", sets / "over_rejection_test.jsonl",
                  sets / "utility_test.jsonl")
    for name in EXTRA_MALICIOUS if extra else ():
        evaluate_step(model_dir, p, out / name, sets / f"{name}.jsonl")


def freeze_spec(method: str, first: int, last: int, num_layers: int) -> str | None:
    """The layers each layer method freezes: none, the safety layers, or as many layers right before / after them."""
    width = last - first + 1
    if method == "full":
        return None
    if method == "sppft":
        return f"{first}:{last}"
    if method == "before":
        return f"{max(0, first - width)}:{first - 1}" if first > 0 else None
    return f"{last + 1}:{min(num_layers - 1, last + width)}" if last < num_layers - 1 else None


def random_layers(width: int, num_layers: int, seed: int, avoid: tuple[int, int] | None = None) -> str | None:
    """A seeded random run of `width` contiguous layers, not overlapping `avoid` (None if no such run exists)."""
    starts = [s for s in range(num_layers - width + 1) if avoid is None or s + width - 1 < avoid[0] or s > avoid[1]]
    if not starts:
        return None
    start = starts[int(torch.randint(len(starts), (1,), generator=torch.Generator().manual_seed(seed)))]
    return f"{start}:{start + width - 1}"


def widened(first: int, last: int, width: int, num_layers: int) -> str:
    """`width` contiguous layers around first..last (centred on them where the model's ends allow)."""
    start = max(0, min(num_layers - width, first - (width - (last - first + 1)) // 2))
    return f"{start}:{start + width - 1}"


@dataclass(frozen=True)
class AttackRun:
    """One fine-tune of the aligned model: an attack set, a method (what is frozen), a seed and a learning rate."""

    attack: str
    method: str
    seed: int
    lr_scale: float = 1.0
    freeze: str | None = None  # FIRST:LAST frozen (layer methods)
    neurons: str | None = None  # --freeze-random-neurons (nfft)
    epochs_factor: int = 1  # > 1: a dose-response run this many times as long as the attack (its own schedule)

    @property
    def label(self) -> str:
        scale = "" if self.lr_scale == 1 else f"-lr{self.lr_scale:g}"
        longer = "" if self.epochs_factor == 1 else f"-x{self.epochs_factor}"
        return f"{self.attack}-{self.method}{scale}{longer}-s{self.seed}"

    @property
    def in_table(self) -> bool:
        """Whether the run is one of the Table 2 comparisons (not the frozen-share sweep or a longer dose run)."""
        return "-w" not in self.method and self.epochs_factor == 1


def method_freeze(method: str, first: int, last: int, num_layers: int, seed: int) -> dict | None:
    """The freeze of a method as AttackRun fields, or None where it cannot apply (no layers before layer 0).

    full / sppft / before / after: as freeze_spec; nfft: as many random neurons as SPPFT freezes parameters;
    random: as many contiguous layers as SPPFT at a random position off the safety layers, drawn per seed;
    sppft-wN: N layers around the safety layers; random-wN: N contiguous layers anywhere (the frozen-share sweep).
    """
    width = last - first + 1
    if method == "nfft":
        return {"neurons": f"like:{first}:{last}"}
    if method == "random":
        spec = random_layers(width, num_layers, seed, avoid=(first, last))
    elif method.startswith("sppft-w"):
        spec = widened(first, last, int(method.removeprefix("sppft-w")), num_layers)
    elif method.startswith("random-w"):
        spec = random_layers(int(method.removeprefix("random-w")), num_layers, seed)
    else:
        spec = freeze_spec(method, first, last, num_layers)
        if method == "full":
            return {}
    return None if spec is None else {"freeze": spec}


def attack_runs(p: Profile, first: int, last: int, num_layers: int) -> list[AttackRun]:
    """Every fine-tune of the profile: attacks x learning rates x methods x seeds (the other learning rates with
    SCALED_METHODS only), the longer dose runs (SCALED_METHODS, the first seed), then the frozen-share sweep."""
    runs = []
    for attack in p.attacks:
        for scale in p.attack_lr_scales:
            for method in p.methods if scale == 1 else [m for m in p.methods if m in SCALED_METHODS]:
                for seed in p.seeds:
                    freeze = method_freeze(method, first, last, num_layers, seed)
                    if freeze is not None:
                        runs.append(AttackRun(attack, method, seed, scale, **freeze))
        if p.long_factor > 1:
            runs += [replace(run, epochs_factor=p.long_factor) for run in runs if run.attack == attack and
                     run.lr_scale == 1 and run.seed == p.seeds[0] and run.method in SCALED_METHODS]
    for width in p.share_widths:
        for kind in ("sppft", "random"):
            for seed in p.seeds:
                freeze = method_freeze(f"{kind}-w{width}", first, last, num_layers, seed)
                runs.append(AttackRun(p.attacks[0], f"{kind}-w{width}", seed, 1.0, **freeze))
    return runs


# ---------------------------------------------------------------- the run


def attack_steps(p: Profile, out: Path, sets: Path, aligned: Path, attack_data: dict[str, Path], run: AttackRun,
                 say: Callable[[str], None]) -> dict[str, dict]:
    """One fine-tune, its evaluation, and the dose-response evaluations of its snapshots, as resumable steps."""
    steps = {}
    target = out / f"attack-{run.label}"
    dose = p.dose if run.seed in p.seeds[:p.dose_seeds] and run.lr_scale == 1 and run.in_table else ()
    settings = step_settings(p, "attack", freeze=run.freeze, neurons=run.neurons, seed=run.seed,
                             lr_scale=run.lr_scale, snapshots=list(dose))
    if run.epochs_factor != 1:  # kept out of the settings otherwise, so earlier runs' records still match
        settings["epochs_factor"] = run.epochs_factor
    epochs = p.attack_epochs * run.epochs_factor
    steps[f"attack-{run.label}"] = run_step(
        f"attack-{run.label}", target, {"model": aligned, "data": attack_data[run.attack]}, settings,
        lambda o: fine_tune(aligned, attack_data[run.attack], o, p, epochs, p.attack_lr * run.lr_scale,
                            run.freeze, seed=run.seed, neurons=run.neurons, snapshots=dose), say)
    rates_only = run.epochs_factor != 1  # a longer dose run: R_h only
    steps[f"eval-{run.label}"] = run_step(
        f"eval-{run.label}", out / f"eval-{run.label}", {"model": target, "sets": sets},
        step_settings(p, "rates" if rates_only else "eval"),
        lambda o: (evaluate_step(target, p, o, sets / "malicious_test.jsonl") if rates_only else
                   evaluate_tests(target, sets, p, o, extra=False)), say)
    for snapshot in sorted(target.glob("snapshot-*")):
        name = f"dose-{run.label}-{snapshot.name}"
        steps[name] = run_step(name, out / name, {"model": snapshot, "sets": sets}, step_settings(p, "rates"),
                               lambda o, m=snapshot: evaluate_step(m, p, o, sets / "malicious_test.jsonl"), say)
    return steps


def run_pipeline(profile: Profile, out: str | Path, model_dir: str | Path, data_dir: str | Path,
                 say: Callable[[str], None] = print, alignment_only: bool = False) -> Path:
    """Every step of the main job (with alignment_only, up to the evaluation of the aligned model); returns the path
    of report.md."""
    out, data_dir, model_dir = Path(out), Path(data_dir), Path(model_dir)
    settings = lambda step, **extra: step_settings(profile, step, **extra)  # noqa: E731
    steps: dict[str, dict] = {}
    sets = out / "data"
    steps["data"] = data_step(profile, data_dir, sets, say)
    # The own-answers cache lives beside the steps, so a changed recipe regenerates only the answers it lacks.
    aligned, align_records = align_steps(profile.recipe, model_dir, sets, out, profile, say, out / "answers.jsonl")
    steps.update(align_records)
    for label, path in (("original", model_dir), ("aligned", aligned)):  # first: a failed alignment shows early
        steps[f"eval-{label}"] = run_step(f"eval-{label}", out / f"eval-{label}", {"model": path, "sets": sets},
                                          settings("eval", extra=True),
                                          lambda o, m=path: evaluate_tests(m, sets, profile, o, True), say)
    if alignment_only:
        report = out / "report.md"
        atomic_write_text(report, alignment_report(profile, out, model_dir, steps))
        return report
    steps["locate"] = run_step("locate", out / "locate", {"model": aligned, "sets": sets},
                               settings("locate"), lambda o: locate_step(aligned, sets, profile, o, scaling=True), say)
    steps["locate_base"] = run_step("locate_base", out / "locate_base", {"model": model_dir, "sets": sets},
                                    settings("locate"),
                                    lambda o: locate_step(model_dir, sets, profile, o, scaling=False), say)
    located = read_json(out / "locate" / "safety_layers.json")
    if located.get("first") is None:
        raise ConfigError(f"{out / 'locate'}: locate found no safety layers (the gap curve shows no gap); "
                          "see its report.md")
    first, last = located["first"], located["last"]
    num_layers = read_json(out / "locate" / "cosine.json")["layers"]
    attack_data = {name: sets / f"attack_{name}.jsonl" for name in profile.attacks}
    if "harmful" in profile.attacks:
        steps["harmful_data"] = run_step("harmful_data", out / "harmful_data", {"model": model_dir, "sets": sets},
                                         settings("harmful_data"),
                                         lambda o: harmful_answers(str(model_dir), sets, profile, o), say)
        attack_data["harmful"] = out / "harmful_data" / "attack_harmful.jsonl"
    runs = attack_runs(profile, first, last, num_layers)
    for run in runs:
        steps.update(attack_steps(profile, out, sets, aligned, attack_data, run, say))
    report = out / "report.md"
    atomic_write_text(report, demo_report(profile, out, model_dir, runs, steps, (first, last), num_layers))
    return report


@dataclass
class PipelineCommand:
    """The command line of python -m minisafe.pipeline."""
    profile: str = option("quick",
        "quick: the make-demo sizes; full: the make-reproduce sizes (several times the quick profile's attacks)",
        choices=sorted(PROFILES))
    out: str = option("runs/demo", "run directory: one sub-directory per step and report.md")
    model: str = option(f"weights/{RECIPE.model}",
        f"unaligned chat model to align and attack (the bundled one: `python -m tools.weights fetch {RECIPE.model}`)")
    data: str = option("data", "directory of the fetched datasets (`python -m tools.fetch_data` writes them)")
    threads: int = option(0, "torch threads (0 = torch's default)", type=non_negative_int)
    alignment_only: bool = option(False, "stop after aligning and evaluating the aligned model on the test splits "
                                  "(report.md then holds the alignment table only; a later run without it goes on)")


@contextmanager
def only_writer(out: Path) -> Iterator[None]:
    """Hold out/.lock while a run writes there. A second run on the same directory would clear the first one's step
    in progress (run_step treats a step without its record as half-made) and race it to the step's record; the lock
    dies with its process, so a killed run leaves nothing to clean up."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(f"{out}: another pipeline run is writing there (pid {lock.read().strip() or '?'}); "
                              "wait for it or stop it first") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


@script()
def main(argv: list[str] | None = None) -> int:
    """Check that the fetched model and data are there, record the command, run every step; exit 2 with one
    "error: ..." line for a user error."""
    args = parse_config(PipelineCommand, argv, __doc__.split("\n")[0], prog="python -m minisafe.pipeline")
    if args.threads:
        torch.set_num_threads(args.threads)
    # The fetch commands are tooling outside the library (tools/); `make demo` runs them before this.
    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"{args.model}: no model directory (no config.json); run `python -m tools.weights fetch "
                          f"{RECIPE.model}` for the bundled model, or pass --model DIR")
    for name in ("harmbench", "donotanswer", "sharegpt"):
        data.fetched(name, args.data)  # names `python -m tools.fetch_data` when a dataset is missing
    record = run_record(PROFILES[args.profile].seed, {"model": args.model, "data": args.data}, profile=args.profile)
    record["command"] = ["python", "-m", "minisafe.pipeline", *(sys.argv[1:] if argv is None else argv)]
    with only_writer(Path(args.out)):
        report = run_pipeline(PROFILES[args.profile], args.out, args.model, args.data,
                              alignment_only=args.alignment_only)
    # Written with the report, not before the steps: it names the command that made report.md (docs/results.md
    # shows it), and a long run still under way must not claim the report of the run before it.
    atomic_write_json(Path(args.out) / "run.json", record)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
