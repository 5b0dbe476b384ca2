"""Build minisafe/prompts/judge_labels.jsonl: a stratified sample of the pipeline's own responses, with provenance,
hand labels merged in by key, and the seeded dev/report split (see minisafe/prompts/judge_labels.md).

    python -m tools.judge_labels sample --data SWEEP/data --out candidates.jsonl \\
        --source original:smollm2-135m-instruct=SWEEP/unaligned-smollm2-135m-instruct/responses.jsonl ...
    python -m tools.judge_labels build --candidates candidates.jsonl --labels hand.jsonl \\
        --out minisafe/prompts/judge_labels.jsonl

A --source is KIND[/ATTACK]:MODEL=RESPONSES: KIND original, aligned or attacked; ATTACK (attacked only) names the
attack run (full, frozen-13:14); MODEL the bundled model it descends from; RESPONSES an eval.py responses.jsonl.
The hand labels file has one {"key", "label", "note"} object a line; every candidate needs one.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import defaultdict
from pathlib import Path

from minisafe.builders import seeded_hash
from minisafe.cli import Parser, output_file, positive_int, script
from minisafe.data import json_lines, jsonl_text
from minisafe.errors import DataError
from minisafe.io import atomic_write_text, content_hash
from minisafe.judge import KeywordJudge
from minisafe.judge_check import LABELS, MODEL_KINDS, assign_splits, check_rows

# eval.py's set names -> the label file's prompt sets, and the sweep's validation file of each.
PROMPT_SETS = {"harmful": "malicious", "utility": "normal", "over_rejection": "over_rejection"}
PROMPT_FILES = {"malicious": "val_malicious.jsonl", "normal": "val_normal.jsonl",
                "over_rejection": "val_over_rejection.jsonl"}
DECODING = {"greedy": True, "max_new_tokens": 64, "template": "chat", "dtype": "bfloat16"}
CAP = 20  # labelled rows per (source, prompt set, keyword verdict) cell, fixed before any label was read
SEED = 0


def parse_source(spec: str) -> tuple[str, str, str, Path]:
    """KIND[/ATTACK]:MODEL=RESPONSES -> (kind, attack, model, responses path)."""
    try:
        head, path = spec.split("=", 1)
        kind_attack, model = head.rsplit(":", 1)  # an attack name may hold a colon (frozen-13:14); a model does not
    except ValueError:
        raise DataError(f"--source {spec!r}: expected KIND[/ATTACK]:MODEL=RESPONSES") from None
    kind, _, attack = kind_attack.partition("/")
    if kind not in MODEL_KINDS or (kind == "attacked") != bool(attack):
        raise DataError(f"--source {spec!r}: KIND must be one of {MODEL_KINDS}, with /ATTACK exactly when attacked")
    return kind, attack or "none", model, Path(path)


def row_key(kind: str, attack: str, model: str, prompt_set: str, prompt: str) -> str:
    """A stable short key of one response: its source and prompt (hand labels are stored by it)."""
    return hashlib.sha256("\0".join((kind, attack, model, prompt_set, prompt)).encode()).hexdigest()[:12]


def source_rows(spec: str, data_dir: Path) -> list[dict]:
    """Every response of one source, with provenance and the keyword verdict recomputed (and checked)."""
    kind, attack, model, path = parse_source(spec)
    responses = [row for _, row in json_lines(path)]
    judge, hashes, rows = KeywordJudge(), {}, []
    for r in responses:
        prompt_set = PROMPT_SETS[r["set"]]
        verdict = "refused" if judge.is_refusal(r["response"]) else "answered"
        if r.get("verdict") and r["verdict"] != verdict:
            raise DataError(f"{path}: the keyword judge now says {verdict} where the file says {r['verdict']}")
        prompt_file = data_dir / PROMPT_FILES[prompt_set]
        for p in (r["model"], prompt_file):
            if str(p) not in hashes:  # once per file: a checkpoint is gigabytes
                if not Path(p).exists():
                    raise DataError(f"{path}: {p} (a response's model or prompt file) does not exist")
                hashes[str(p)] = content_hash(p)
        rows.append({"key": row_key(kind, attack, model, prompt_set, r["prompt"]), "prompt": r["prompt"],
                     "response": r["response"], "prompt_set": prompt_set, "model_kind": kind, "model": model,
                     "attack": attack, "checkpoint": r["model"], "checkpoint_sha256": hashes[r["model"]],
                     "prompt_file": str(prompt_file), "prompt_file_sha256": hashes[str(prompt_file)],
                     "decoding": DECODING, "keyword_verdict": verdict})
    return rows


def stratified_sample(rows: list[dict], cap: int, seed: int) -> list[dict]:
    """Up to `cap` rows of each (source, prompt set, keyword verdict) cell, seeded; each row gets its cell weight."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        cells[(row["model_kind"], row["attack"], row["model"], row["prompt_set"], row["keyword_verdict"])].append(row)
    chosen = []
    for cell in sorted(cells):
        members = sorted(cells[cell], key=lambda r: seeded_hash(seed, r["key"]))[:cap]
        chosen += [{**r, "weight": round(len(cells[cell]) / len(members), 4)} for r in members]
    return chosen


def build(candidates: list[dict], labels: dict[str, dict], seed: int) -> list[dict]:
    """Candidates with ids, hand labels and the dev/report split, in a fixed order."""
    missing = [c["key"] for c in candidates if c["key"] not in labels]
    if missing:
        raise DataError(f"{len(missing)} candidates have no hand label (first: {missing[0]})")
    rows = []
    for i, c in enumerate(sorted(candidates, key=lambda c: (c["model_kind"], c["attack"], c["model"],
                                                                c["prompt_set"], c["key"])), start=1):
        hand = labels[c["key"]]
        if hand["label"] not in LABELS:
            raise DataError(f"hand label of {c['key']}: {hand['label']!r} is not one of {LABELS}")
        rows.append({"id": f"j{i:04d}", **{k: v for k, v in c.items() if k != "key"}, "key": c["key"],
                     "label": hand["label"], "note": hand.get("note", ""), "split": ""})
    splits = assign_splits(rows, seed)
    rows = [{**row, "split": splits[row["id"]]} for row in rows]
    check_rows(rows, "judge_labels")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="stratified candidates with provenance")
    s.add_argument("--source", action="append", required=True, help="KIND[/ATTACK]:MODEL=RESPONSES (repeatable)")
    s.add_argument("--data", required=True, type=Path, help="the sweep's data/ directory (validation prompt files)")
    s.add_argument("--cap", type=positive_int, default=CAP, help="rows per (source, prompt set, verdict) cell")
    s.add_argument("--out", required=True, type=output_file, help="candidates JSONL to write")
    b = sub.add_parser("build", help="merge hand labels and split")
    b.add_argument("--candidates", required=True, type=Path, help="JSONL written by 'sample'")
    b.add_argument("--labels", required=True, type=Path, help='hand labels: {"key", "label", "note"} a line')
    b.add_argument("--out", required=True, type=output_file, help="the labelled file to write")
    for q in (s, b):
        q.add_argument("--seed", type=int, default=SEED, help="seed of the sample / the split")
    return p.parse_args(argv)


@script()
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.command == "sample":
        rows = [r for spec in a.source for r in source_rows(spec, a.data)]
        out = stratified_sample(rows, a.cap, a.seed)
    else:
        read = lambda path: [row for _, row in json_lines(path)]  # noqa: E731
        out = build(read(a.candidates), {h["key"]: h for h in read(a.labels)}, a.seed)
    atomic_write_text(a.out, jsonl_text(out))
    print(f"{len(out)} rows -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
