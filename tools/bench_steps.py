"""The pipeline's own fine-tuning steps under the code of an earlier commit and under this tree, from their step logs.

    python -m tools.bench_steps --run runs/demo --before 0f6853c --out runs/bench/steps.json

For each fine-tuning stage of a finished pipeline run (the alignment's SFT and DPO, and one attack), train.py runs
that stage's recorded settings (its run.json: data, model, objective, epochs, learning rate, ...) for --steps steps,
once with the code of --before (checked out into a temporary git worktree) and once with this tree's, the two in
turn, each in a process of its own, --repeat rounds. From each train_log.jsonl: the seconds outside the step loop
(loading, the DPO reference pass, the audit, and the checkpoint a --max-steps run saves where a whole run saves its
model) and the mean step after the first; their medians over the rounds are projected to the run's own number of
steps (its train_log.jsonl), the attack's to every attack of the run (SPPFT's and the controls' too).
`python -m minisafe.report bench runs/bench --out docs/bench.md` renders the file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minisafe.cli import whole
from tools.bench import record_header, write_results

ROOT = Path(__file__).resolve().parent.parent
# train.py settings a stage's run.json records that both codes accept, as flags.
FLAGS = ("model", "data", "objective", "epochs", "lr", "batch_size", "grad_accum", "warmup_steps", "schedule",
         "weight_decay", "grad_clip", "max_len", "dtype", "template", "beta", "seed")


def stages(run: Path) -> dict[str, list[Path]]:
    """Stage name -> the run's fine-tuning directories of that stage (each with run.json and train_log.jsonl)."""
    found = {"align": [run / "align"], "align_dpo": [run / "align_dpo"],
             "attack": sorted(p for p in run.glob("attack-*") if (p / "train_log.jsonl").is_file())}
    for name, dirs in found.items():
        if not dirs or not all((d / "run.json").is_file() and (d / "train_log.jsonl").is_file() for d in dirs):
            raise ValueError(f"--run {run}: no finished {name} fine-tune (run.json and train_log.jsonl)")
    return found


def train_args(record: Path, steps: int, out: Path) -> list[str]:
    """train.py's command line for the first `steps` steps of the fine-tune that wrote run.json `record`."""
    settings = json.loads(record.read_text(encoding="utf-8"))["settings"]
    args = ["train.py", "--out", str(out), "--max-steps", str(steps), "--save-every", "0", "--no-progress"]
    for name in FLAGS:
        if settings.get(name) is not None:
            value = settings[name]
            args += [f"--{name.replace('_', '-')}", str(Path(value).resolve()) if name in ("model", "data") else
                     str(value)]
    return args


def timed_run(code: Path, args: list[str], out: Path) -> dict:
    """Run train.py of `code` in a process of its own: its wall time and the step times of its train_log.jsonl."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=code, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    elapsed = [json.loads(line)["elapsed_s"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return {"wall_s": wall, "steps": len(elapsed), "first_step_s": elapsed[0], "mean_step_s": statistics.mean(steps),
            "outside_loop_s": wall - elapsed[-1]}


def projected(sample: dict, steps: int) -> float:
    """A stage's wall time at `steps` steps: the time outside the loop, the first step, then the mean step."""
    return sample["outside_loop_s"] + sample["first_step_s"] + (steps - 1) * sample["mean_step_s"]


def median_sample(samples: list[dict]) -> dict:
    """Each number's median over repeated samples of one stage under one code, with the samples themselves."""
    return {**{key: statistics.median(s[key] for s in samples) for key in samples[0]}, "samples": samples}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def compare(run: Path, found: dict[str, list[Path]], before: str, steps: int, repeat: int) -> dict:
    """Every stage (of stages(run)) under both codes, in turn, `repeat` times; the medians, their projections to the
    run's own step counts, and the ratio of the totals."""
    # Generated documents do not change the code being timed.
    edited = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                                ":!docs") else ""
    samples: dict = {name: {"before": [], "now": []} for name in found}
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "before"
        git("worktree", "add", "--detach", "-q", str(worktree), before)
        try:
            for _ in range(repeat):
                for name, dirs in found.items():
                    for label, code in (("before", worktree), ("now", ROOT)):
                        out = Path(tmp) / f"{label}-{name}"
                        shutil.rmtree(out, ignore_errors=True)
                        sample = timed_run(code, train_args(dirs[0] / "run.json", steps, out), out)
                        samples[name][label].append(sample)
                        print(f"{name} {label}: {sample['mean_step_s']:.2f} s/step, "
                              f"{sample['outside_loop_s']:.0f} s outside the loop", flush=True)
        finally:
            git("worktree", "remove", "--force", str(worktree))
    results: dict = {"run": str(run), "before": before, "now": git("rev-parse", "--short", "HEAD") + edited,
                     "repeat": repeat, "stages": {}}
    for name, dirs in found.items():
        counts = [len((d / "train_log.jsonl").read_text().splitlines()) for d in dirs]
        stage = results["stages"][name] = {"runs": len(dirs), "run_steps": counts, "sample_steps": steps}
        for label in ("before", "now"):
            stage[label] = median_sample(samples[name][label])
            stage[label]["projected_s"] = sum(projected(stage[label], n) for n in counts)
    totals = {label: sum(s[label]["projected_s"] for s in results["stages"].values()) for label in ("before", "now")}
    results.update(projected_total_s=totals, ratio=totals["before"] / totals["now"])
    return results


def main(argv: list[str] | None = None) -> int:
    """Check the run and the commit, time both codes, write every number; exit 2 with one line for a user error."""
    p = argparse.ArgumentParser(prog="python -m tools.bench_steps", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished pipeline run (default: runs/demo)")
    p.add_argument("--before", required=True, help="the commit whose code is the yardstick")
    p.add_argument("--steps", type=whole(2), default=8,
                   help="steps sampled per stage and code, at least 2 (the first is timed apart) (default: 8)")
    p.add_argument("--repeat", type=whole(1), default=2,
                   help="rounds of both codes in turn; medians are reported (default: 2)")
    p.add_argument("--out", type=Path, help="write every number here as JSON (default: print it)")
    a = p.parse_args(argv)
    try:
        found = stages(a.run)
    except ValueError as err:
        p.error(str(err))
    try:
        git("rev-parse", "--verify", "-q", f"{a.before}^{{commit}}")
    except subprocess.CalledProcessError:
        p.error(f"--before {a.before}: not a commit of this repository")
    write_results({**record_header("tools.bench_steps", argv),
                   "pipeline_steps": compare(a.run, found, a.before, a.steps, a.repeat)}, a.out)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
