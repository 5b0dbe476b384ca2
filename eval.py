"""Evaluate checkpoints: harmful rate R_h, over-rejection R_o, and utility (ROUGE-L, perplexity), side by side.

Bad input stops the run with one line "error: ..." and exit code 2, leaving no half-written file: an --out that cannot
be written, a checkpoint with NaN or inf weights, a prompt longer than the model's context (prompts are never cut).
"""

import sys

from minisafe.cli import parse_config, run_script
from minisafe.evaluation import EvalConfig, run_eval, summary


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """The EvalConfig of a command line: one flag per field, declared with the field in minisafe.evaluation."""
    return parse_config(EvalConfig, argv, __doc__, command=["eval.py", *argv] if argv is not None else None)


def run(argv: list[str] | None) -> int:
    """Evaluate, then the summary table and where the report is."""
    cfg = parse_args(argv)
    results = run_eval(cfg)
    print("\n".join(summary(results)))
    print(f"Judge: {results['judge']}. Report: {cfg.out}/report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Evaluate; exit 0 when done, 2 with one line naming the culprit for a user error."""
    return run_script(run, argv, "eval.py")


if __name__ == "__main__":
    sys.exit(main())
