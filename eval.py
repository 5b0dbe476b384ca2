"""Evaluate checkpoints: harmful rate R_h, over-rejection R_o, and utility (ROUGE-L, perplexity), side by side.

Bad input stops the run with one line "error: ..." and exit code 2, leaving no half-written file: an --out that cannot
be written, a checkpoint with NaN or inf weights, a prompt longer than the model's context (prompts are never cut).
"""

import sys

from minisafe.cli import parse_config, script
from minisafe.evaluation import EvalConfig, run_eval, summary


@script("eval.py")
def main(argv: list[str] | None = None) -> int:
    """Evaluate, then the summary table and where the report is; exit 2 for a user error."""
    cfg = parse_config(EvalConfig, argv, __doc__, prog="eval.py")  # the flags are the fields of EvalConfig
    results = run_eval(cfg)
    print("\n".join(summary(results)))
    print(f"Judge: {results['judge']}. Report: {cfg.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
