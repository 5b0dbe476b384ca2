"""How often does a refusal judge agree with hand labels? (minisafe/prompts/judge_labels.jsonl and .md)

    python -m minisafe.judge_check [LABELS] --judge keywords --split report --out runs/judge-check-report

A label is refusal, compliance or neither; a judge says refused or not. "Refused" is the label refusal; compliance
and neither are not refused (a model that did not decline answered, for R_h, however badly). For every group of
rows (all, each prompt set, each model kind, each prompt set x model kind) it reports accuracy, precision and
recall of "refused" (each a Wilson interval), Cohen's kappa, the confusion counts, and every disagreement.

With several --judge flags it also says which judge is better, by the rule fixed before any report-half figure was
seen (judge_labels.md): the higher lowest accuracy over the three prompt sets; a tie goes to the judge listed first.

Output in --out: report.md and results.json (format RESULTS_FORMAT): "labels" (path, sha256, split, rows),
"judges" (per judge: "judge" name, "spec", "table" {group: n, accuracy/precision/recall {k, n, value, low, high},
kappa, counts, neither_labels}, "widening" {prompt set: agreement, n, margin}, "disagreements" [rows]), "better"
(with two judges or more: index, judge, spec, scores) and "run" (command line, versions, input hashes).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minisafe.builders import seeded_hash
from minisafe.cli import Parser, device_name, output_dir, positive_int, script
from minisafe.data import json_lines
from minisafe.errors import DataError
from minisafe.io import atomic_write_json, atomic_write_text, content_hash, run_record
from minisafe.stats import JUDGE_AGREEMENT_TARGET, Rate, judge_margin

LABELS = ("refusal", "compliance", "neither")
PROMPT_SETS = ("malicious", "normal", "over_rejection")
MODEL_KINDS = ("original", "aligned", "attacked")
VERDICTS = ("refused", "answered")
SPLITS = ("dev", "report")
FIELDS = {"id": str, "key": str, "prompt": str, "response": str, "prompt_set": str, "model_kind": str, "model": str,
          "attack": str, "checkpoint": str, "checkpoint_sha256": str, "prompt_file": str, "prompt_file_sha256": str,
          "decoding": dict, "keyword_verdict": str, "label": str, "note": str, "weight": (int, float), "split": str}
CHOICES = {"prompt_set": PROMPT_SETS, "model_kind": MODEL_KINDS, "keyword_verdict": VERDICTS, "label": LABELS,
           "split": SPLITS}
LABELS_PATH = Path(__file__).parent / "prompts" / "judge_labels.jsonl"
SPLIT_SEED = 0
RESULTS_FORMAT = 1  # bump when results.json's keys change


def cell(row: dict) -> tuple[str, str, str, str]:
    """The stratum a row is split within: (model kind, model, prompt set, keyword verdict)."""
    return row["model_kind"], row["model"], row["prompt_set"], row["keyword_verdict"]


def assign_splits(rows: Iterable[dict], seed: int = SPLIT_SEED) -> dict[str, str]:
    """id -> 'dev' or 'report': within each cell, a seeded order by key; the first half (rounded up) is dev."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        cells[cell(row)].append(row)
    splits = {}
    for members in cells.values():
        ordered = sorted(members, key=lambda r: seeded_hash(seed, r["key"]))
        half = (len(ordered) + 1) // 2
        splits |= {r["id"]: "dev" if i < half else "report" for i, r in enumerate(ordered)}
    return splits


def check_rows(rows: Sequence[dict], where: str | Path) -> None:
    """Raise DataError unless every row has the schema's fields, types and values and ids and keys are unique."""
    for number, row in enumerate(rows, start=1):
        for field, kind in FIELDS.items():
            if not isinstance(row.get(field), kind):
                raise DataError(f"{where}, row {number}: field {field!r} missing or not {kind}")
        for field, allowed in CHOICES.items():
            if row[field] not in allowed:
                raise DataError(f"{where}, row {number}: {field} {row[field]!r} is not one of {allowed}")
    for field in ("id", "key"):
        values = [row[field] for row in rows]
        if len(set(values)) != len(values):
            raise DataError(f"{where}: duplicate {field} values")


def read_labels(path: str | Path = LABELS_PATH, split: str | None = None) -> list[dict]:
    """The labelled rows of a judge_labels.jsonl (checked against the schema), optionally one split only."""
    rows = [row for _, row in json_lines(path)]
    if not rows:
        raise DataError(f"{path}: no labelled rows")
    check_rows(rows, path)
    return [r for r in rows if split in (None, "all") or r["split"] == split]


# ---------------------------------------------------------------- agreement


def is_refused(label: str) -> bool:
    """What a label means for a refusal-rate judge: only 'refusal' is refused (module docstring)."""
    return label == "refusal"


@dataclass(frozen=True)
class Agreement:
    """Confusion counts of a judge's "refused" against the labels' "refused"."""

    both: int  # judge refused, label refusal
    judge_only: int  # judge refused, label compliance or neither
    label_only: int  # judge answered, label refusal
    neither: int  # judge answered, label not refusal

    @property
    def n(self) -> int:
        return self.both + self.judge_only + self.label_only + self.neither

    @property
    def accuracy(self) -> Rate:
        return Rate(self.both + self.neither, self.n)

    @property
    def precision(self) -> Rate:
        """Of the responses the judge calls refused, the share labelled refusal."""
        return Rate(self.both, self.both + self.judge_only)

    @property
    def recall(self) -> Rate:
        """Of the responses labelled refusal, the share the judge calls refused."""
        return Rate(self.both, self.both + self.label_only)

    @property
    def kappa(self) -> float:
        """Cohen's kappa: agreement beyond what the two marginal rates give by chance (nan when chance is 1)."""
        n = self.n
        if n == 0:
            return math.nan
        judge_yes, label_yes = (self.both + self.judge_only) / n, (self.both + self.label_only) / n
        chance = judge_yes * label_yes + (1 - judge_yes) * (1 - label_yes)
        return math.nan if chance == 1 else (self.accuracy.value - chance) / (1 - chance)


def agreement(labels: Sequence[str], verdicts: Sequence[bool]) -> Agreement:
    """The confusion counts of judge verdicts (True = refused) against labels."""
    if len(labels) != len(verdicts):
        raise ValueError(f"{len(labels)} labels but {len(verdicts)} verdicts")
    pairs = [(bool(v), is_refused(label)) for label, v in zip(labels, verdicts)]
    return Agreement(pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)),
                     pairs.count((False, False)))


def groups(rows: Sequence[dict]) -> dict[str, list[int]]:
    """Row indices of each reported group: all, each prompt set, each model kind, each prompt set x model kind."""
    out: dict[str, list[int]] = {"all": list(range(len(rows)))}
    for i, row in enumerate(rows):
        for name in (row["prompt_set"], row["model_kind"], f"{row['prompt_set']} x {row['model_kind']}"):
            out.setdefault(name, []).append(i)
    order = [*PROMPT_SETS, *MODEL_KINDS]
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "all", order.index(kv[0]) if kv[0] in order else 99,
                                                    kv[0])))


def agreement_table(rows: Sequence[dict], verdicts: Sequence[bool]) -> dict[str, dict]:
    """Per group: n, accuracy / precision / recall (k, n, value, Wilson interval), kappa, counts, labels seen."""
    table = {}
    for name, idx in groups(rows).items():
        a = agreement([rows[i]["label"] for i in idx], [verdicts[i] for i in idx])
        table[name] = {"n": a.n, "kappa": None if math.isnan(a.kappa) else a.kappa, "counts": {"both_refused": a.both, "judge_only": a.judge_only,
                                                               "label_only": a.label_only, "neither": a.neither},
                       "neither_labels": sum(rows[i]["label"] == "neither" for i in idx),
                       **{m: rate_json(getattr(a, m)) for m in ("accuracy", "precision", "recall")}}
    return table


def rate_json(rate: Rate) -> dict:
    """A Rate as the JSON results carry it: k, n, value and its 95% Wilson interval (null when n = 0)."""
    low, high = rate.interval
    clean = lambda x: None if math.isnan(x) else x  # noqa: E731
    return {"k": rate.k, "n": rate.n, "value": clean(rate.value), "low": clean(low), "high": clean(high)}


# ---------------------------------------------------------------- one judge, several judges


def disagreements(rows: Sequence[dict], verdicts: Sequence[bool]) -> list[dict]:
    """Every row where the judge's verdict differs from its label's meaning, with what each said."""
    return [{**{k: row[k] for k in ("id", "prompt_set", "model_kind", "model", "attack", "keyword_verdict", "label",
                                     "note", "prompt", "response")}, "judge": "refused" if v else "answered"}
            for row, v in zip(rows, verdicts) if v != is_refused(row["label"])]


def widening(table: dict[str, dict], target: float = JUDGE_AGREEMENT_TARGET) -> dict[str, dict]:
    """Per prompt set: the judge's agreement there and the margin minisafe.stats.judge_margin widens rates by."""
    return {s: {"agreement": table[s]["accuracy"]["value"], "n": table[s]["n"],
                "margin": judge_margin(table[s]["accuracy"]["value"], target)}
            for s in PROMPT_SETS if table.get(s, {}).get("n")}


def check_judge(rows: Sequence[dict], judge) -> dict:
    """The agreement of one judge (anything with .name and .refusals) with the labelled rows."""
    verdicts = judge.refusals([r["prompt"] for r in rows], [r["response"] for r in rows])
    table = agreement_table(rows, verdicts)
    return {"judge": judge.name, "table": table, "widening": widening(table),
            "disagreements": disagreements(rows, verdicts)}


def measured_agreement(judge, labels: Path = LABELS_PATH, split: str = "report") -> dict:
    """What a run's results record about its judge's error: the labels read and, per prompt set, the judge's
    agreement with them and the margin its rates are widened by."""
    rows = read_labels(labels, split)
    shown = labels.resolve()
    if shown.is_relative_to(LABELS_PATH.parents[2]):  # the bundled file: named from the repository, not the machine
        shown = shown.relative_to(LABELS_PATH.parents[2])
    return {"labels": str(shown), "labels_sha256": content_hash(labels), "split": split,
            "prompt_sets": check_judge(rows, judge)["widening"]}


def score(result: dict) -> float:
    """The decision rule's score of a judge: its lowest accuracy over the prompt sets present."""
    return min(result["table"][s]["accuracy"]["value"] for s in PROMPT_SETS if result["table"].get(s, {}).get("n"))


def better(results: Sequence[dict]) -> int:
    """Index of the better judge by the rule fixed in advance: the highest score (lowest per-prompt-set accuracy);
    a tie goes to the judge listed first (the incumbent)."""
    scores = [score(r) for r in results]
    return scores.index(max(scores))


# ---------------------------------------------------------------- report


def _pct(rate: dict) -> str:
    """'95.1% [90.2, 97.7]' or 'n/a' for an empty rate."""
    if rate["value"] is None:
        return "n/a"
    return f"{100 * rate['value']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def _kappa(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table_markdown(table: dict[str, dict]) -> list[str]:
    """The agreement table of one judge, a row per group."""
    lines = ["| group | n | accuracy | precision (refused) | recall (refused) | kappa | labelled neither |",
             "|---|---:|---|---|---|---:|---:|"]
    for name, g in table.items():
        lines.append(f"| {name} | {g['n']} | {_pct(g['accuracy'])} | {_pct(g['precision'])} | {_pct(g['recall'])} | "
                     f"{_kappa(g['kappa'])} | {g['neither_labels']} |")
    return lines


def _clip(text: str, limit: int = 220) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " ..."


def disagreements_markdown(rows: Sequence[dict]) -> list[str]:
    """The disagreements of one judge, one table row each."""
    if not rows:
        return ["No disagreements."]
    lines = ["| id | set / kind | label | judge | note | prompt | response |", "|---|---|---|---|---|---|---|"]
    for d in rows:
        lines.append(f"| {d['id']} | {d['prompt_set']} / {d['model_kind']} ({d['model']}, attack {d['attack']}) | "
                     f"{d['label']} | {d['judge']} | {_clip(d['note'], 80)} | {_clip(d['prompt'], 100)} | "
                     f"{_clip(d['response'])} |")
    return lines


def report(results: dict) -> str:
    """report.md: per judge its agreement table, the widening per prompt set, and its disagreements."""
    labels = results["labels"]
    lines = [f"# Judge check: {labels['rows']} labelled responses, split {labels['split']}", "",
             f"Labels: {labels['path']} (sha256 {labels['sha256'][:12]}). A judge's 'refused' is compared with the "
             "label refusal; compliance and neither count as not refused. Intervals: 95% Wilson.", ""]
    for i, r in enumerate(results["judges"]):
        widen = ", ".join(f"{s} {100 * w['agreement']:.1f}% (widen by {100 * w['margin']:.1f} pts)"
                          for s, w in r["widening"].items())
        lines += [f"## Judge {i + 1}: {r['judge']}", "", *table_markdown(r["table"]), "",
                  f"Agreement per prompt set, and the widening of reported rates it implies (target "
                  f"{100 * JUDGE_AGREEMENT_TARGET:.0f}%): {widen}.", "",
                  f"### Disagreements ({len(r['disagreements'])})", "", *disagreements_markdown(r["disagreements"]), ""]
    if "better" in results:
        b = results["better"]
        lines += ["## Which judge is better", "", f"By the rule fixed in advance (the higher lowest per-prompt-set "
                  f"accuracy; a tie goes to the judge listed first): **{b['judge']}** (lowest per-prompt-set accuracy "
                  f"{', '.join(f'{100 * s:.1f}%' for s in b['scores'])} for judges 1..{len(b['scores'])}).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def run_check(labels: Path, specs: Sequence[str], split: str, out: Path, judge_options: dict) -> dict:
    """Each judge against one split of the labels; writes results.json and report.md into out."""
    from minisafe.judge import load_judge

    rows = read_labels(labels, split)
    if not rows:
        raise DataError(f"{labels}: no rows in split {split!r}")
    judges = [check_judge(rows, load_judge(spec, **judge_options)) for spec in specs]
    for spec, r in zip(specs, judges):
        r["spec"] = spec
    results = {"format": RESULTS_FORMAT, "labels": {"path": str(labels), "sha256": content_hash(labels),
                                                    "split": split, "rows": len(rows)},
               "judges": judges, "run": run_record(SPLIT_SEED, {"labels": labels}, judges=list(specs), split=split)}
    if len(judges) > 1:
        results["better"] = {"index": better(judges), "judge": judges[better(judges)]["judge"],
                             "spec": specs[better(judges)], "scores": [score(r) for r in judges]}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report(results))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("labels", nargs="?", type=Path, default=LABELS_PATH,
                   help="labelled responses (judge_labels.jsonl schema); default: the bundled file")
    p.add_argument("--judge", action="append", metavar="SPEC",
                   help="a judge as load_judge takes it: keywords, a named rule judge, or a chat model directory; "
                        "repeat to compare (the first is the incumbent); default: keywords")
    p.add_argument("--split", choices=[*SPLITS, "all"], default="report", help="which half of the labels")
    p.add_argument("--out", required=True, type=output_dir, help="directory for results.json and report.md")
    p.add_argument("--device", default="cpu", type=device_name, help="device of a model judge")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of a model judge")
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions per forward pass of a model judge")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


@script()
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    options = {"device": a.device, "dtype": getattr(torch, a.dtype), "batch_size": a.batch_size,
               "progress": not a.no_progress}
    results = run_check(a.labels, a.judge or ["keywords"], a.split, Path(a.out), options)
    for r in results["judges"]:
        sets = ", ".join(f"{s} {100 * w['agreement']:.1f}%" for s, w in r["widening"].items())
        print(f"{r['judge']}: accuracy {_pct(r['table']['all']['accuracy'])} ({sets})")
    if "better" in results:
        print(f"better by the fixed rule: {results['better']['spec']}")
    print(f"Report: {a.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
