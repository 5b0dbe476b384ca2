"""What safety fine-tuning changes inside a model (Jain et al., NeurIPS 2024): compare two checkpoints, or run the
synthetic task-concept lab.

    python mechanistic.py compare --before DIR --after DIR --out DIR [--layers I:J] [--template chat|alpaca]
    python mechanistic.py synthetic --out DIR
"""

import argparse
import sys

from minisafe.cli import Parser, add_options, config_from_args, script
from minisafe.analysis import CompareConfig, compare, separation
from minisafe.synthetic import LabConfig, run_lab, summary_rows

COMMANDS = {"compare": CompareConfig, "synthetic": LabConfig}


def parse_args(argv: list[str] | None = None) -> CompareConfig | LabConfig:
    """The config of a command line: the sub-command picks it, its fields give the flags."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    c = sub.add_parser("compare", formatter_class=fmt, help="tau per layer and weight changes of a before/after pair",
                       description="tau per layer (safe / unsafe / jailbreak prompts) before and after, and the "
                                   "weight change of every projection matrix; writes mechanistic.json, report.md, "
                                   "tau.png, weights.png, run.json")
    add_options(c, CompareConfig)
    s = sub.add_parser("synthetic", formatter_class=fmt, help="the synthetic lab: pre-train, SSFT / DPO / unlearning, "
                                                              "analyse",
                       description="PCFG text x bijective operators; pre-train a small minisafe model, safety "
                                   "fine-tune it with train.py's sft, dpo and unlearn objectives, then measure "
                                   "behaviour, tau and weight changes; writes results.json, report.md, tau.png")
    add_options(s, LabConfig)
    a = p.parse_args(argv)
    return config_from_args(COMMANDS[a.command], a)


def run_compare(cfg: CompareConfig) -> None:
    """Compare, then the tau separation per layer before and after."""
    result = compare(cfg)
    for which in ("before", "after"):
        print(f"tau separation (safe - unsafe) per layer, {which}: "
              + " ".join(f"{x:.2f}" for x in separation(result["tau"][which])))
    print(f"Report: {cfg.out}/report.md")


def run_synthetic(cfg: LabConfig) -> None:
    """Run the lab, then its summary rows."""
    results = run_lab(cfg)
    print("\n".join(summary_rows(results)))
    print(f"Wall time {results['timings']['total_s']:.0f} s. Report: {cfg.out}/report.md")


@script("mechanistic.py")
def main(argv: list[str] | None = None) -> int:
    """Parse, run the sub-command, summarise; exit 2 with one line naming the culprit for a user error."""
    cfg = parse_args(argv)
    (run_compare if isinstance(cfg, CompareConfig) else run_synthetic)(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
