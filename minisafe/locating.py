"""Locating the safety layers (Li et al., sections 3.3-3.5): per-layer cosine analysis, then the scaling search.

1. Cosine analysis. Every prompt's last-token output of every layer is read once. Random pairs of normal-normal
   (N-N), normal-malicious (N-M) and malicious-malicious (M-M) prompts give, per layer, the mean and std of the
   cosine similarity; the angle gap is arccos(mean N-M) - arccos(mean N-N), in degrees. With `center`, the mean
   vector of all prompts is subtracted per layer first (raw cosines of small models sit near 0.99 because every
   prompt shares one large component).
2. Initial range, read off the gap curve ("from the appearance of the gap to the first smoothing"), see
   `initial_range`.
3. Over-rejection search. R_o = refusals on benign prompts with dangerous-sounding words. Scaling the safety layers
   up (alpha > 1) makes the model refuse more; so sweep the upper bound, then the lower bound, keeping the range
   with the most refusals (the fewest when alpha < 1), see `search_bounds`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from minisafe import checkpoint, data
from minisafe.checkpoint import DTYPES
from minisafe.cli import (check_fields, device_name, layer_range, non_negative_int, option, output_dir, positive_float,
                          positive_int, whole)
from minisafe.errors import ConfigError, DataError
from minisafe.fastpath import fast_inference
from minisafe.freeze import check_layer_range
from minisafe.generate import generate, similar_length_batches
from minisafe.hooks import record_layers, scaled_layers
from minisafe.io import atomic_write_json, atomic_write_text, run_record
from minisafe.judge import load_judge
from minisafe.model import Transformer
from minisafe.plots import plot_cosine
from minisafe.tokenizer import TEMPLATES, Tokenizer

PAIR_TYPES = ("N-N", "N-M", "M-M")


@torch.inference_mode()
def last_token_vectors(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], template: str,
                       batch_size: int = 16, progress: bool = True, source: str = "prompts") -> Tensor:
    """Output of every layer at each prompt's last token: [N, L, D] float32 (prompt pass only, no generation).
    `source` names the prompt set in errors."""
    ids = tokenizer.prompts_ids(prompts, template, source)
    out = torch.empty(len(ids), model.config.num_layers, model.config.hidden_size)
    with record_layers(model) as records, fast_inference(model):
        for rows in tqdm(similar_length_batches(ids, batch_size), desc="layer vectors", disable=not progress):
            input_ids, mask = tokenizer.pad_left([ids[i] for i in rows])
            model(input_ids, mask, last_logits_only=True)
            out[rows] = torch.stack([records[layer].pop() for layer in range(model.config.num_layers)], dim=1)
    return out


def random_pairs(n_a: int, n_b: int, count: int, distinct: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` random index pairs (a, b); with `distinct` (same set) a != b."""
    a = rng.integers(0, n_a, count)
    if not distinct:
        return a, rng.integers(0, n_b, count)
    b = rng.integers(0, n_a - 1, count)
    return a, b + (b >= a)  # skip a itself, uniformly over the others


def cosine_analysis(normal: Tensor, malicious: Tensor, pairs: int = 500, seed: int = 0, center: bool = False) -> dict:
    """Per-layer mean / std of pair cosines for N-N, N-M, M-M, and the angle gap in degrees.

    normal [P, L, D], malicious [Q, L, D]. Returns lists indexed by layer: {"N-N": {"mean", "std"}, ..., "gap"}.
    """
    if center:
        mean = torch.cat([normal, malicious]).mean(dim=0, keepdim=True)
        normal, malicious = normal - mean, malicious - mean
    rng = np.random.default_rng(seed)
    sets = {"N": normal, "M": malicious}
    result: dict = {}
    for kind in PAIR_TYPES:
        x, y = sets[kind[0]], sets[kind[2]]
        i, j = random_pairs(len(x), len(y), pairs, distinct=kind[0] == kind[2], rng=rng)
        cos = torch.nn.functional.cosine_similarity(x[i], y[j], dim=-1)  # [pairs, L]
        result[kind] = {"mean": cos.mean(0).tolist(), "std": cos.std(0).tolist()}
    result["gap"] = [angle(nm) - angle(nn) for nm, nn in zip(result["N-M"]["mean"], result["N-N"]["mean"])]
    return result


def angle(cosine: float) -> float:
    """Degrees of arccos, clipped so that rounding just past +-1 stays defined."""
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


@dataclass
class RangeRule:
    """The documented rule that reads the initial range off a gap curve."""

    min_gap: float = 2.0  # degrees the gap must rise by, or there is no gap
    appear: float = 0.1  # the gap has appeared once it has covered this share of its rise
    smooth: float = 0.25  # the rise has smoothed once a layer adds less than this share of the steepest step


def initial_range(gap: Sequence[float], rule: RangeRule = RangeRule()) -> tuple[int, int] | None:
    """[i, j] "from the appearance of the gap to the first smoothing", or None when the curve has no gap.

    With peak = the layer of the largest gap and base = the smallest gap up to it:
    - no gap when gap[peak] - base < rule.min_gap degrees;
    - i = the layer after the last one (up to the peak) whose gap is within rule.appear of the rise above base:
      from i on the gap has appeared and stays;
    - the steepest step is the largest gap[l] - gap[l-1] for l in (i, peak];
    - j = the first layer from the steepest step on after which the next step is smaller than rule.smooth times
      the steepest one (the curve levels off, or falls), or the peak.
    """
    g = np.asarray(gap, dtype=float)
    peak = int(g.argmax())
    base = float(g[: peak + 1].min())
    rise = g[peak] - base
    if rise < rule.min_gap:
        return None
    below = np.flatnonzero(g[: peak + 1] - base < rule.appear * rise)
    i = int(below[-1]) + 1
    if i == peak:
        return i, i
    steps = np.diff(g)  # steps[l - 1] = g[l] - g[l - 1]
    steepest = i + 1 + int(np.argmax(steps[i: peak]))  # a layer l in (i, peak]
    j = steepest
    while j < peak and steps[j] >= rule.smooth * steps[steepest - 1]:
        j += 1
    return i, j


@dataclass
class Search:
    """The outcome of the over-rejection scaling search."""

    first: int
    last: int
    alpha: float
    baseline: int
    trace: list[dict] = field(default_factory=list)


def search_bounds(refusals: Callable[[int, int], int], initial: tuple[int, int], num_layers: int, alpha: float,
                  sweep: int = 2, baseline: int = 0) -> Search:
    """The paper's two sweeps: the upper bound over j-sweep..j+sweep with i fixed, then the lower bound with that j.

    `refusals(first, last)` counts refusals with layers first..last scaled by alpha. The best range has the most
    refusals for alpha > 1 and the fewest for alpha < 1; ties go to the candidate nearest the initial bound, then
    to the smaller one. Each range is counted once.
    """
    i0, j0 = initial
    better = (lambda a, b: a > b) if alpha > 1 else (lambda a, b: a < b)
    seen: dict[tuple[int, int], int] = {}
    trace: list[dict] = []

    def count(first: int, last: int, phase: str) -> int:
        if (first, last) not in seen:
            seen[first, last] = refusals(first, last)
        trace.append({"phase": phase, "first": first, "last": last, "refusals": seen[first, last]})
        return seen[first, last]

    def best_of(candidates: list[int], make: Callable[[int], tuple[int, int]], centre: int, phase: str) -> int:
        candidates = sorted(candidates, key=lambda c: (abs(c - centre), c))
        scores = {c: count(*make(c), phase) for c in candidates}
        best = candidates[0]
        for c in candidates[1:]:
            if better(scores[c], scores[best]):
                best = c
        return best

    uppers = [j for j in range(j0 - sweep, j0 + sweep + 1) if i0 <= j < num_layers]
    j = best_of(uppers, lambda c: (i0, c), j0, "upper")
    lowers = [i for i in range(i0 - sweep, i0 + sweep + 1) if 0 <= i <= j]
    i = best_of(lowers, lambda c: (c, j), i0, "lower")
    trace.sort(key=lambda t: (t["phase"] != "upper", t["first"] if t["phase"] == "lower" else t["last"]))
    return Search(first=i, last=j, alpha=alpha, baseline=baseline, trace=trace)


def choose_alpha(refusals_at: Callable[[float], int], baseline: int, n_prompts: int, upward: bool = True,
                 step: float = 0.05, max_steps: int = 6, noise: float = 0.02) -> tuple[float, list[dict]]:
    """The paper's rule: step alpha away from 1 by `step` until R_o on the initial range moves clearly.

    "Clearly" = by at least max(3, noise * n_prompts) refusals (the paper's noise was 15-20 of 721, about 2-3%), and
    in the direction the method expects: scaling safety layers up (alpha > 1) should add refusals, scaling them
    down remove them; a move the other way says nothing about the range and does not count ("moved" is signed).
    If no alpha within max_steps moves it that far, the one that moved it most is used; the trace says so.
    """
    threshold = max(3.0, noise * n_prompts)
    trace = []
    for k in range(1, max_steps + 1):
        alpha = round(1 + k * step if upward else 1 - k * step, 4)
        count = refusals_at(alpha)
        moved = count - baseline if upward else baseline - count
        trace.append({"alpha": alpha, "refusals": count, "moved": moved, "threshold": threshold})
        if moved >= threshold:
            return alpha, trace
    return max(trace, key=lambda t: t["moved"])["alpha"], trace


class RefusalCounter:
    """R_o of a model with a layer range scaled; generations are made once per (range, alpha) and kept."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], judge, template: str,
                 max_new_tokens: int = 16, batch_size: int = 32, scale_o_proj: bool = True, progress: bool = True,
                 source: str = "over-rejection prompts"):
        self.model, self.tokenizer, self.prompts, self.judge = model, tokenizer, list(prompts), judge
        self.ids = tokenizer.prompts_ids(self.prompts, template, source)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.scale_o_proj, self.progress = scale_o_proj, progress
        self.responses: dict[tuple, list[str]] = {}

    def __call__(self, first: int | None = None, last: int | None = None, alpha: float = 1.0) -> int:
        key = (None, None, 1.0) if first is None or alpha == 1.0 else (first, last, alpha)
        if key not in self.responses:
            self.responses[key] = self._generate(*key)
        return sum(self.judge.refusals(self.prompts, self.responses[key]))

    def _generate(self, first: int | None, last: int | None, alpha: float) -> list[str]:
        def run() -> list[str]:
            return generate(self.model, self.tokenizer, self.ids, self.max_new_tokens, self.batch_size,
                            progress=self.progress).texts
        if first is None:
            return run()
        with scaled_layers(self.model, first, last, alpha, self.scale_o_proj):
            return run()


def pick(prompts: Sequence[str], n: int | None, seed: int) -> list[str]:
    """A seeded sample of n prompts (all of them, in file order, when n is None or covers the set)."""
    if n is None or n >= len(prompts):
        return list(prompts)
    keep = np.random.default_rng(seed).choice(len(prompts), n, replace=False)
    return [prompts[i] for i in sorted(keep)]


def format_table1(search: Search, initial: tuple[int, int]) -> list[str]:
    """The localisation as the paper's Table 1 reads: baseline R_o, the two sweeps, the result."""
    ups = [t for t in search.trace if t["phase"] == "upper"]
    lows = [t for t in search.trace if t["phase"] == "lower"]
    sweep = lambda rows, key: ", ".join(f"[{r['first']},{r['last']}]: {r['refusals']}" for r in rows)  # noqa: E731
    return [
        "| alpha | initial | baseline R_o | upper-bound sweep | lower-bound sweep | safety layers |",
        "|---|---|---|---|---|---|",
        f"| {search.alpha} | [{initial[0]},{initial[1]}] | {search.baseline} | {sweep(ups, 'last')} | "
        f"{sweep(lows, 'first')} | [{search.first},{search.last}] |",
    ]


AUTO_ALPHAS = ("auto", "auto-down")


def alpha_value(text: str) -> str | float:
    """--alpha: 'auto', 'auto-down', or a finite scaling factor > 0 other than 1 (which would scale nothing)."""
    if text in AUTO_ALPHAS:
        return text
    try:
        value = positive_float(text)
    except argparse.ArgumentTypeError:
        value = None
    if value is None or value == 1:
        raise argparse.ArgumentTypeError(f"must be 'auto', 'auto-down' or a finite scaling factor > 0 other than 1 "
                                         f"(1 scales nothing), got {text!r}")
    return value


def alpha_fields(value: str | float) -> dict:
    """The LocateConfig fields of an --alpha value: a factor, or None (automatic) and the direction of the steps."""
    return {"alpha": None if value in AUTO_ALPHAS else value, "alpha_down": value == "auto-down"}


@dataclass
class LocateConfig:
    model: str = option(help="Hugging Face model directory (safetensors)")
    out: str = option(help="output directory for cosine.json/png, safety_layers.json, report.md", type=output_dir)
    normal: str | None = option(None, "normal prompts (txt/csv/json/jsonl); default: the bundled normal instructions")
    malicious: str | None = option(None, "malicious prompts (AdvBench CSV works as is); default: fetched HarmBench")
    over_rejection: str | None = option(None, "benign prompts with dangerous-sounding words; default: the bundled set")
    n_prompts: int = option(100, "P = Q: normal and malicious prompts sampled (seeded)", type=whole(2))
    n_over_rejection: int | None = option(None,
        "score a seeded sample of N over-rejection prompts in the scaling search (default: all)", type=positive_int,
        metavar="N")
    pairs: int = option(500, "random pairs drawn per type (N-N, N-M, M-M)", type=whole(2))
    template: str = option("alpaca",
        "prompt format: the paper's Alpaca template or the model's own chat template", choices=TEMPLATES)
    center: bool = option(False,
        "also analyse after subtracting each layer's mean vector; the range is read off that curve")
    initial: tuple[int, int] | None = option(None,
        "initial range (0-based, inclusive) instead of the gap-curve rule", type=layer_range, metavar="I:J")
    # alpha None = automatic (the paper's stepping rule)
    alpha: float | None = option(None,
        "scaling factor (> 0, not 1), or 'auto' (step by 0.05 above 1 until R_o moves clearly), or 'auto-down'",
        type=alpha_value, to_fields=alpha_fields, cli_default="auto")
    alpha_down: bool = False  # automatic alpha steps below 1 (look for the fewest refusals); set by --alpha auto-down
    sweep: int = option(2, "each bound is swept over +-SWEEP layers", type=non_negative_int)
    skip_scaling: bool = option(False, "cosine analysis only; no over-rejection search")
    scale_o_proj: bool = option(True, "leave o_proj unscaled, as the paper-era script effectively did")
    max_new_tokens: int = option(16, "greedy tokens generated per over-rejection prompt", type=positive_int)
    batch_size: int = option(32, "prompts per forward pass", type=positive_int)
    device: str = option("cpu", "cpu or cuda", type=device_name)
    dtype: str = option("float32", "weights and activations", choices=DTYPES)
    seed: int = option(0, "seed of the prompt sample and the pairs", type=non_negative_int)
    judge: str = option("keywords", "refusal judge: 'keywords' or a judge model directory")
    progress: bool = option(True, "hide the progress bars")


def cosine_prompt_sets(cfg: LocateConfig) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
    """The seeded normal and malicious samples of the cosine analysis, each after the name of its set. Pairs are of
    distinct prompts, so each sample needs two at least."""
    malicious = str(cfg.malicious or data.default_malicious_path())
    sets = ((cfg.normal or "bundled normal prompts",
             data.read_prompts(cfg.normal) if cfg.normal else data.bundled_prompts("normal")),
            (malicious, data.read_prompts(malicious)))
    for source, prompts in sets:
        if len(prompts) < 2:
            raise DataError(f"{source}: {len(prompts)} prompt(s); the cosine analysis pairs distinct prompts and "
                            "needs at least 2")
    return tuple((source, pick(prompts, cfg.n_prompts, cfg.seed)) for source, prompts in sets)


def check_initial(model: Transformer, initial: tuple[int, int]) -> None:
    """A ConfigError naming --initial unless the range lies inside the model."""
    try:
        check_layer_range(model.config.num_layers, *initial)
    except ConfigError as e:
        raise ConfigError(f"--initial {initial[0]}:{initial[1]}: {e}") from None


def cosine_step(model: Transformer, tok: Tokenizer, cfg: LocateConfig,
                sets: tuple[tuple[str, list[str]], tuple[str, list[str]]]) -> dict:
    """cosine.json: the raw cosine analysis of the normal and malicious samples, and the centred one with center."""
    (_, normal), (_, malicious) = sets
    vectors = [last_token_vectors(model, tok, prompts, cfg.template, cfg.batch_size, cfg.progress, source)
               for source, prompts in sets]
    analyses = {"raw": cosine_analysis(*vectors, cfg.pairs, cfg.seed)}
    if cfg.center:
        analyses["centred"] = cosine_analysis(*vectors, cfg.pairs, cfg.seed, center=True)
    return {"layers": model.config.num_layers, "template": cfg.template, "n_normal": len(normal),
            "n_malicious": len(malicious), "pairs": cfg.pairs, **analyses}


def scaling_search(model: Transformer, tok: Tokenizer, cfg: LocateConfig, initial: tuple[int, int],
                   out: Path) -> tuple[Search, dict]:
    """The over-rejection search from `initial` (alpha chosen first when automatic): its Search and the fields it adds
    to safety_layers.json; writes every generation to responses.json."""
    over = data.read_prompts(cfg.over_rejection) if cfg.over_rejection else data.bundled_prompts("over_rejection")
    over = pick(over, cfg.n_over_rejection, cfg.seed)
    counter = RefusalCounter(model, tok, over, load_judge(cfg.judge), cfg.template, cfg.max_new_tokens,
                             cfg.batch_size, cfg.scale_o_proj, cfg.progress,
                             cfg.over_rejection or "bundled over-rejection set")
    baseline = counter()
    alpha, alpha_trace = cfg.alpha, []
    if alpha is None:
        alpha, alpha_trace = choose_alpha(lambda a: counter(*initial, a), baseline, len(over),
                                          upward=not cfg.alpha_down)
    search = search_bounds(lambda i, j: counter(i, j, alpha), initial, model.config.num_layers, alpha, cfg.sweep,
                           baseline)
    atomic_write_json(out / "responses.json", [
        {"first": k[0], "last": k[1], "alpha": k[2], "responses": v} for k, v in counter.responses.items()])
    return search, dict(first=search.first, last=search.last, alpha=alpha, baseline_refusals=baseline,
                        n_over_rejection=len(over), trace=search.trace, alpha_trace=alpha_trace,
                        scale_o_proj=cfg.scale_o_proj, max_new_tokens=cfg.max_new_tokens, judge=cfg.judge)


def run_locate(cfg: LocateConfig) -> dict:
    """The whole procedure; writes cosine.json, cosine.png, safety_layers.json, report.md and run.json into cfg.out."""
    check_fields(cfg)
    out = Path(cfg.out)  # created by its first file, so that a run failing before any result leaves nothing
    sets = cosine_prompt_sets(cfg)
    model, tok = checkpoint.load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    if cfg.initial is not None:
        check_initial(model, cfg.initial)
    start = time.perf_counter()
    cosine = cosine_step(model, tok, cfg, sets)
    timings = {"cosine_s": time.perf_counter() - start}
    atomic_write_json(out / "cosine.json", cosine)
    # The range is read off the paper's raw metric unless centring was asked for.
    found = initial_range(cosine["centred" if cfg.center else "raw"]["gap"])
    initial = cfg.initial or found
    result: dict = {"initial": list(initial) if initial else None, "initial_from": "--initial" if cfg.initial else
                    ("gap curve" if found else "none: the gap curve shows no gap"),
                    "gap_metric": "centred" if cfg.center else "raw"}
    search = None
    if initial and not cfg.skip_scaling:
        start = time.perf_counter()
        search, found_fields = scaling_search(model, tok, cfg, initial, out)
        timings["search_s"] = time.perf_counter() - start
        result.update(found_fields)
    elif initial:
        result.update(first=initial[0], last=initial[1], alpha=None, baseline_refusals=None, trace=[])
    result["timings"] = timings
    atomic_write_json(out / "safety_layers.json", result)
    write_locate_outputs(cfg, cosine, result, search, initial)
    return result


def write_locate_outputs(cfg: LocateConfig, cosine: dict, result: dict, search: Search | None,
                         initial: tuple[int, int] | None) -> None:
    """cosine.png, report.md and run.json, after safety_layers.json."""
    out = Path(cfg.out)
    located = (search.first, search.last) if search else None
    analyses = {k: cosine[k] for k in ("raw", "centred") if k in cosine}
    plot_cosine(analyses, out / "cosine.png", Path(cfg.model).name, located, initial)
    atomic_write_text(out / "report.md", locate_report(cfg, cosine, result, search, initial))
    inputs = {"model": cfg.model, "normal": cfg.normal, "malicious": cfg.malicious,
              "over_rejection": cfg.over_rejection}
    settings = {k: v for k, v in vars(cfg).items() if k not in ("progress", "seed")}
    atomic_write_json(out / "run.json", run_record(cfg.seed, inputs, **settings))


def locate_report(cfg: LocateConfig, cosine: dict, result: dict, search: Search | None,
                  initial: tuple[int, int] | None) -> str:
    """report.md: the setting, the gap per layer, and the Table 1 row."""
    lines = [f"# Safety layers of {Path(cfg.model).name}", "",
             f"Template: {cfg.template}; {cosine['n_normal']} normal and {cosine['n_malicious']} malicious prompts; "
             f"{cfg.pairs} pairs per type; seed {cfg.seed}.", "", "![cosine](cosine.png)", "",
             "| layer | N-N | N-M | M-M | gap (deg) |" + (" centred gap (deg) |" if "centred" in cosine else ""),
             "|---|---|---|---|---|" + ("---|" if "centred" in cosine else "")]
    raw = cosine["raw"]
    for layer in range(cosine["layers"]):
        row = f"| {layer} | " + " | ".join(f"{raw[k]['mean'][layer]:.4f}" for k in PAIR_TYPES)
        row += f" | {raw['gap'][layer]:.2f} |"
        if "centred" in cosine:
            row += f" {cosine['centred']['gap'][layer]:.2f} |"
        lines.append(row)
    lines.append("")
    if initial is None:
        lines.append("The gap curve shows no gap (it rises by less than "
                     f"{RangeRule().min_gap} degrees); pass --initial I:J to run the scaling search anyway.")
    else:
        lines.append(f"Initial range [{initial[0]},{initial[1]}] ({result['initial_from']}).")
    if search is not None:
        lines += ["", f"Over-rejection search: {result['n_over_rejection']} prompts, greedy, "
                  f"{cfg.max_new_tokens} new tokens, judge {cfg.judge}, o_proj "
                  f"{'scaled' if cfg.scale_o_proj else 'not scaled (paper-era script)'}.", ""]
        lines += format_table1(search, initial)
        if result["alpha_trace"]:
            lines += ["", "Automatic alpha: " + ", ".join(
                f"{t['alpha']}: {t['refusals']} (moved {t['moved']})" for t in result["alpha_trace"])
                + f"; threshold {result['alpha_trace'][0]['threshold']:.1f} refusals."]
    timings = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in result["timings"].items())
    lines += ["", f"Time: {timings}.", ""]
    return "\n".join(lines)
