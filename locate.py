"""Find the safety layers of a checkpoint: per-layer cosine analysis, then the over-rejection scaling search.

Writes cosine.json, cosine.png, safety_layers.json, report.md and run.json into --out. A user error (an --out that
cannot be written, NaN or inf weights, a prompt longer than the model's context: prompts are never cut) is one
"error: ..." line and exit code 2, and leaves no half-written file.
"""

import sys

from minisafe.cli import parse_config, script
from minisafe.locating import LocateConfig, run_locate


@script("locate.py")
def main(argv: list[str] | None = None) -> int:
    """Locate, then one line: the safety layers found and where the report is; exit 2 for a user error."""
    cfg = parse_config(LocateConfig, argv, __doc__, prog="locate.py")  # the flags are the fields of LocateConfig
    result = run_locate(cfg)
    if result.get("first") is None:
        print(f"No gap in the cosine analysis; see {cfg.out}/report.md")
    else:
        searched = f" (alpha {result['alpha']}, baseline R_o {result['baseline_refusals']})" if result.get("alpha") else ""
        print(f"Safety layers: {result['first']}:{result['last']}{searched}; initial {result['initial']} "
              f"from {result['initial_from']}. Report: {cfg.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
