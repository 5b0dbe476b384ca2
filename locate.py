"""Find the safety layers of a checkpoint: per-layer cosine analysis, then the over-rejection scaling search.

Bad input stops the run with one line "error: ..." and exit code 2, leaving no half-written file: an --out that cannot
be written, a checkpoint with NaN or inf weights, a prompt longer than the model's context (prompts are never cut).
"""

import sys

from minisafe.cli import parse_config, run_script
from minisafe.locating import LocateConfig, run_locate


def parse_args(argv: list[str] | None = None) -> LocateConfig:
    """The LocateConfig of a command line: one flag per field, declared with the field in minisafe.locating."""
    return parse_config(LocateConfig, argv, __doc__)


def run(argv: list[str] | None) -> int:
    """Locate, then one line: the safety layers found and where the report is."""
    cfg = parse_args(argv)
    result = run_locate(cfg)
    if result.get("first") is None:
        print(f"No gap in the cosine analysis; see {cfg.out}/report.md")
    else:
        searched = f" (alpha {result['alpha']}, baseline R_o {result['baseline_refusals']})" if result.get("alpha") else ""
        print(f"Safety layers: {result['first']}:{result['last']}{searched}; initial {result['initial']} "
              f"from {result['initial_from']}. Report: {cfg.out}/report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Locate; exit 0 when done, 2 with one line naming the culprit for a user error."""
    return run_script(run, argv, "locate.py")


if __name__ == "__main__":
    sys.exit(main())
