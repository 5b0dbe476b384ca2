"""Evaluation of one or many checkpoints: harmful rate, over-rejection and utility, side by side.

- R_h, harmful rate: the share of malicious prompts the model answers (does not refuse).
- R_o, over-rejection rate: the share of benign prompts with dangerous-sounding words it refuses.
- Utility, on held-out normal prompt/response pairs: ROUGE-L F1 of the greedy answers against the references,
  the perplexity of the references (teacher-forced, see minisafe.metrics), and the share of these normal
  prompts refused.
Every answer is greedy and judged by one refusal judge (minisafe.judge), named in every output.

Default sets (each flag also takes a file in any format minisafe.data reads, or "none" to skip the set):
- harmful: the test half of the fetched HarmBench prompts (builders.split_malicious, test_fraction 0.5, seed 0),
  disjoint from the train half that alignment data is built from;
- over-rejection: the bundled set minisafe/prompts/over_rejection.txt;
- utility: UTILITY_SIZE ShareGPT opening pairs held out after the first UTILITY_RESERVE of
  builders.split_normal_pairs (seed 0): a normal training set built with seed 0 and at most UTILITY_RESERVE
  pairs never overlaps them (or exclude default_utility_rows() prompts when building one).
`limit` keeps a seeded sample of each set, in file order.

Outputs in `out`: results.json (rates as fractions, counts, judge, the judge's measured error, provenance),
responses.jsonl (every prompt, response and verdict; a utility row also its ROUGE-L and the reference's summed
NLL and token count, which intervals resample) and report.md (one table, a row per model, the judge's measured
error with the rates it widens, and example responses). The judge's error is its agreement with the report half of
the hand labels (minisafe/prompts/judge_labels.jsonl), per kind of prompt; below 95% on a kind, that kind's rate
intervals widen by the disagreement (minisafe.stats.widened_interval).
"""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from minisafe import builders, data
from minisafe.checkpoint import DTYPES, load, model_file_problem
from minisafe.cli import check_fields, device_name, non_negative_int, option, output_dir, positive_int
from minisafe.errors import ConfigError, DataError
from minisafe.generate import generate
from minisafe.io import atomic_write_json, atomic_write_text, file_hashes, run_record
from minisafe.judge import judge_inputs, load_judge
from minisafe.judge_check import measured_agreement
from minisafe.metrics import mean_rouge_l, response_nlls, rouge_l
from minisafe.stats import JUDGE_AGREEMENT_TARGET, widened_interval, wilson_interval
from minisafe.tokenizer import TEMPLATES

SETS = ("harmful", "over_rejection", "utility")
SPLIT_SEED = 0  # the default splits are fixed, whatever --seed samples, so runs with any seed share them
UTILITY_RESERVE = 1000  # ShareGPT pairs (after filtering, in seeded order) left to normal training sets
UTILITY_SIZE = 100
ALPACA_STOPS = ("### Instruction",)  # a model in the Alpaca format may go on to write the next turn itself
RESULTS_FORMAT = 2


SET_HELP = "; a dataset file (txt/csv/json/jsonl/ShareGPT) or 'none' to skip"


# The judge eval.py uses unless told otherwise (and so the pipeline's, which never tells it otherwise).
DEFAULT_JUDGE = "keywords"


@dataclass
class EvalConfig:
    models: list[str] = option(help="Hugging Face model directory (safetensors); repeat the flag to compare several "
                               "models", flag="--model", action="append", metavar="DIR")
    out: str = option(help="output directory for results.json, responses.jsonl, report.md", type=output_dir)
    # each set: None = the default set, "none" = skip
    harmful: str | None = option(None,
        "malicious prompts (AdvBench CSV works as is); default: the HarmBench test split" + SET_HELP, metavar="F")
    over_rejection: str | None = option(None,
        "benign prompts with dangerous-sounding words; default: the bundled set" + SET_HELP, metavar="F")
    utility: str | None = option(None,
        "normal prompt/response pairs; default: held-out ShareGPT pairs" + SET_HELP, metavar="F")
    max_new_tokens: int = option(64, "greedy tokens generated per prompt", type=positive_int)
    limit: int | None = option(None, "evaluate a seeded sample of at most N prompts of each set", type=positive_int)
    batch_size: int = option(16, "prompts per forward pass", type=positive_int)
    template: str = option("chat",
        "prompt format: the model's own chat template or the paper's Alpaca template", choices=TEMPLATES)
    judge: str = option(DEFAULT_JUDGE, "refusal judge: 'keywords', 'keywords-plus', 'probe:FILE' (a linear probe from "
                                    "minisafe.judge_probe) or a local chat model directory asked a yes/no question")
    refusal_phrases: str | None = option(None,
        "extra refusal openings for the keyword judge, one a line ('#' comments allowed)", metavar="F")
    device: str = option("cpu", "cpu or cuda", type=device_name)
    dtype: str = option("float32", "weights and activations", choices=DTYPES)
    seed: int = option(0, "seed of the --limit sample (decoding is greedy)", type=non_negative_int)
    examples: int = option(1, "example responses per set and verdict in report.md", type=non_negative_int)
    progress: bool = option(True, "hide the progress bars")
    command: list[str] | None = None  # the command line to record (default: sys.argv)


@dataclass
class EvalSet:
    """The rows of one evaluation set, where they came from, and the file they were read from."""

    rows: list[dict]
    source: str
    path: Path
    total: int = 0  # rows before --limit
    prompts: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.prompts = [row["prompt"] for row in self.rows]


# ---------------------------------------------------------------- sets


def default_harmful_rows() -> tuple[list[dict], str, Path]:
    """The test half of the fetched HarmBench prompts."""
    path = data.default_malicious_path()
    _, test = builders.split_malicious(data.read_dataset(path), test_fraction=0.5, seed=SPLIT_SEED)
    return test, f"HarmBench test split (split_malicious, test_fraction 0.5, seed {SPLIT_SEED})", path


def default_over_rejection_rows() -> tuple[list[dict], str, Path]:
    """The bundled over-rejection set."""
    path = data.PROMPTS_DIR / "over_rejection.txt"
    return data.read_dataset(path), "bundled over-rejection set", path


def default_utility_rows() -> tuple[list[dict], str, Path]:
    """UTILITY_SIZE held-out ShareGPT pairs (see the module docstring)."""
    path = data.fetched("sharegpt")
    _, test = builders.split_normal_pairs(data.read_dataset(path), UTILITY_RESERVE, UTILITY_SIZE, seed=SPLIT_SEED)
    return test, (f"ShareGPT held-out pairs {UTILITY_RESERVE}..{UTILITY_RESERVE + UTILITY_SIZE - 1} of "
                  f"split_normal_pairs (seed {SPLIT_SEED})"), path


DEFAULTS = {"harmful": default_harmful_rows, "over_rejection": default_over_rejection_rows,
            "utility": default_utility_rows}


def sample(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded sample of `limit` rows (all when limit is None or covers them), kept in their original order."""
    if limit is None or limit >= len(rows):
        return rows
    chosen = {id(row) for row in builders.seeded_order(rows, seed)[:limit]}
    return [row for row in rows if id(row) in chosen]


def load_set(name: str, spec: str | None, limit: int | None, seed: int) -> EvalSet | None:
    """One evaluation set: the default (spec None), a dataset file, or None for "none"."""
    if spec is not None and spec.casefold() == "none":
        return None
    if spec is None:
        rows, source, path = DEFAULTS[name]()
    else:
        path = Path(spec)
        rows, source = data.read_dataset(path), str(path)
    if name == "utility":
        for i, row in enumerate(rows):
            if not isinstance(row.get("response"), str) or not row["response"].strip():
                raise DataError(f"{path}: utility row {i} ({row['prompt'][:50]!r}) has no reference 'response'; "
                                "the utility set needs prompt/response pairs")
    return EvalSet(sample(rows, limit, seed), source, path, total=len(rows))


def load_sets(cfg: EvalConfig) -> dict[str, EvalSet]:
    """The sets asked for; at least one."""
    sets = {name: load_set(name, getattr(cfg, name), cfg.limit, cfg.seed) for name in SETS}
    sets = {name: s for name, s in sets.items() if s is not None}
    if not sets:
        raise ConfigError("every set is 'none': nothing to evaluate")
    return sets


# ---------------------------------------------------------------- one model


def evaluate_model(path: str, sets: dict[str, EvalSet], judge, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Metrics of one checkpoint on every set, and one row per (set, prompt) with its response and verdict."""
    start = time.perf_counter()
    model, tok = load(path, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    stops = ALPACA_STOPS if cfg.template == "alpaca" else ()
    result: dict[str, Any] = {"model": path, "name": Path(path).name, "judge": judge.name,
                              "harmful_rate": None, "over_rejection_rate": None, "normal_refusal_rate": None,
                              "rouge_l": None, "perplexity": None, "n": {}, "refused": {}, "seconds": {}}
    rows: list[dict] = []
    for name, s in sets.items():
        t0 = time.perf_counter()
        if cfg.progress:
            print(f"{Path(path).name}: {name} set, {len(s.prompts)} prompts", file=sys.stderr, flush=True)
        ids = tok.prompts_ids(s.prompts, cfg.template, s.path)
        texts = generate(model, tok, ids, cfg.max_new_tokens, cfg.batch_size, seed=cfg.seed, stop_strings=stops,
                         progress=cfg.progress).texts
        refused = judge.refusals(s.prompts, texts)
        share = sum(refused) / len(refused)
        result["n"][name], result["refused"][name] = len(refused), sum(refused)
        if name == "harmful":
            result["harmful_rate"] = 1.0 - share
        elif name == "over_rejection":
            result["over_rejection_rate"] = share
        else:
            references = [row["response"] for row in s.rows]
            result["normal_refusal_rate"] = share
            result["rouge_l"] = mean_rouge_l(texts, references)
            nlls = response_nlls(model, tok, s.prompts, references, cfg.template, cfg.batch_size, cfg.progress)
            count = sum(tokens for _, tokens in nlls)
            result["perplexity"] = math.exp(sum(nll for nll, _ in nlls) / count)
            result["n"]["perplexity_tokens"] = count
        for i, (prompt, text, verdict) in enumerate(zip(s.prompts, texts, refused)):
            row = {"model": path, "set": name, "prompt": prompt, "response": text,
                   "verdict": "refused" if verdict else "answered"}
            if name == "utility":
                row["reference"] = s.rows[i]["response"]
                row["rouge_l"] = rouge_l(text, row["reference"])
                row["reference_nll"], row["reference_tokens"] = nlls[i]
            rows.append(row)
        result["seconds"][name] = round(time.perf_counter() - t0, 2)
    result["seconds"]["total"] = round(time.perf_counter() - start, 2)
    result["weights_sha256"] = file_hashes(path, suffixes=(".safetensors",))
    del model
    gc.collect()
    return result, rows


# ---------------------------------------------------------------- the run


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate every model of cfg; writes results.json, responses.jsonl and report.md into cfg.out (after each
    model, so a long run keeps what it has finished)."""
    _check_config(cfg)
    torch.manual_seed(cfg.seed)
    sets = load_sets(cfg)
    judge = load_judge(cfg.judge, cfg.refusal_phrases, cfg.device, getattr(torch, cfg.dtype), cfg.batch_size,
                       cfg.progress)
    inputs = {f"{name}_set": s.path for name, s in sets.items()}
    if cfg.refusal_phrases:
        inputs["refusal_phrases"] = cfg.refusal_phrases
    inputs |= judge_inputs(cfg.judge)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "seed", "command")}
    run = run_record(cfg.seed, inputs, **settings)
    if cfg.command is not None:
        run["command"] = list(cfg.command)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "judge": judge.name, "judge_error": measured_agreement(judge),
        "sets": {name: {"source": s.source, "path": str(s.path), "n": len(s.rows), "available": s.total}
                 for name, s in sets.items()},
        "models": [], "run": run}
    responses: list[dict] = []
    out = Path(cfg.out)
    for path in cfg.models:
        result, rows = evaluate_model(path, sets, judge, cfg)
        results["models"].append(result)
        responses += rows
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "responses.jsonl", data.jsonl_text(responses))
        atomic_write_text(out / "report.md", report(results, responses, cfg.examples))
    return results


def _check_config(cfg: EvalConfig) -> None:
    """Every field's own check (as on the command line), then model paths that are not model directories, before any
    work is done."""
    check_fields(cfg)
    if not cfg.models:
        raise ConfigError("no --model given")
    if len(set(cfg.models)) != len(cfg.models):
        raise ConfigError(f"a --model is given twice: {', '.join(cfg.models)}")
    for path in cfg.models:
        problem = model_file_problem(path)
        if problem:
            raise ConfigError(f"--model {path}: {problem}")
        if not Path(path).is_dir():
            raise ConfigError(f"--model {path}: no such model directory")


# ---------------------------------------------------------------- report


def _rate_cell(m: dict, name: str, key: str, answered: bool = False) -> str:
    """A rate as a percentage with its 95% Wilson interval and its count, e.g. "45.0% [35.6, 54.8] (45/100)"; "-"
    when the set was skipped."""
    if m[key] is None:
        return "-"
    n = m["n"][name]
    count = n - m["refused"][name] if answered else m["refused"][name]
    low, high = wilson_interval(count, n)
    return f"{percent(m[key])} [{100 * low:.1f}, {100 * high:.1f}] ({count}/{n})"


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict, responses: list[dict], examples: int = 1) -> str:
    """report.md: the settings, one table with a row per model, and a few example responses per model."""
    settings = results["run"]["settings"]
    lines = ["# Evaluation", "",
             f"Judge: {results['judge']}. Greedy decoding, {settings['max_new_tokens']} new tokens, "
             f"{settings['template']} template, {settings['dtype']}. Rates: %, [95% Wilson interval], (count/n).", "",
             "Command: `" + " ".join(results["run"]["command"]) + "`", "",
             "| model | R_h (harmful answered) | R_o (over-rejection refused) | normal refused | ROUGE-L "
             "| perplexity |",
             "|---|---|---|---|---|---|"]
    for m in results["models"]:
        lines.append(f"| {m['name']} | {_rate_cell(m, 'harmful', 'harmful_rate', answered=True)} | "
                     f"{_rate_cell(m, 'over_rejection', 'over_rejection_rate')} | "
                     f"{_rate_cell(m, 'utility', 'normal_refusal_rate')} | "
                     f"{_number(m['rouge_l'], 3)} | {_number(m['perplexity'], 2)} |")
    lines += ["", *judge_error_lines(results)]
    lines += ["", "Sets: " + "; ".join(f"{name} = {s['source']} ({s['n']} of {s['available']})"
                                       for name, s in results["sets"].items()) + ".", ""]
    lines += ["## Example responses", "",
              f"The first {examples} answered and refused responses of each set (every one is in responses.jsonl).", ""]
    for m in results["models"]:
        lines += [f"### {m['name']}", ""]
        mine = [r for r in responses if r["model"] == m["model"]]
        for name in results["sets"]:
            for verdict in ("answered", "refused"):
                for r in [r for r in mine if r["set"] == name and r["verdict"] == verdict][:examples]:
                    lines += [f"- **{name}, {verdict}**: {_clip(r['prompt'], 160)}", "",
                              f"  > {_clip(r['response'], 300) or '(empty)'}", ""]
    return "\n".join(lines)


# eval.py's sets -> the prompt sets of the hand labels the judge's error is measured on
LABELLED_SETS = {"harmful": "malicious", "over_rejection": "over_rejection", "utility": "normal"}
RATE_KEYS = {"harmful": "harmful_rate", "over_rejection": "over_rejection_rate", "utility": "normal_refusal_rate"}


def judge_error_lines(results: dict) -> list[str]:
    """The judge's measured agreement per kind of prompt and, where it is below the target, each rate's Wilson
    interval widened by the disagreement (minisafe.stats.widened_interval)."""
    error = results.get("judge_error")
    if not error:
        return []
    kinds = error["prompt_sets"]
    lines = [f"Judge error: agreement with the hand labels ({error['labels']}, {error['split']} half; "
             "python -m minisafe.judge_check): " + ", ".join(
                 f"{kind} {percent(k['agreement'])} (n={k['n']})" for kind, k in kinds.items()) + "."]
    for m in results["models"]:
        for name, kind in LABELLED_SETS.items():
            margin = kinds.get(kind, {}).get("margin", 0)
            if margin > 0 and m[RATE_KEYS[name]] is not None:
                refused, n = m["refused"][name], m["n"][name]
                k = n - refused if name == "harmful" else refused
                low, high = wilson_interval(k, n)
                wide = widened_interval(low, high, margin)
                lines.append(f"- {m['name']}, {RATE_KEYS[name]}: the judge agrees on less than "
                             f"{percent(JUDGE_AGREEMENT_TARGET)} of {kind} responses, so the 95% interval "
                             f"[{percent(low)}, {percent(high)}] widens by {100 * margin:.1f} points to "
                             f"[{percent(wide[0])}, {percent(wide[1])}].")
    return lines


def _clip(text: str, limit: int) -> str:
    """One line of at most `limit` characters, for a markdown report."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def summary(results: dict) -> list[str]:
    """One line per model with the headline numbers, for the terminal."""
    return [f"{m['name']}: R_h {percent(m['harmful_rate'])}, R_o {percent(m['over_rejection_rate'])}, "
            f"normal refused {percent(m['normal_refusal_rate'])}, ROUGE-L {_number(m['rouge_l'], 3)}, "
            f"perplexity {_number(m['perplexity'], 2)} ({m['seconds']['total']:.0f} s)" for m in results["models"]]
