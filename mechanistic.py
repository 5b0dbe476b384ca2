"""What safety fine-tuning changes inside a model (Jain et al., NeurIPS 2024): compare two checkpoints, run the
synthetic task-concept lab, or attack models with optimised input embeddings.

    python mechanistic.py compare --before DIR --after DIR --out DIR [--layers I:J] [--template chat|alpaca]
    python mechanistic.py synthetic --out DIR
    python mechanistic.py attack --model DIR [--model DIR ...] --out DIR [--budgets 1 2 5 20 100] [--layers I:J]
"""

import argparse
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from minisafe.analysis import CompareConfig, compare, separation
from minisafe.attacks import AttackRunConfig, run_attack
from minisafe.cli import Parser, add_options, config_from_args, script
from minisafe.synthetic import LabConfig, run_lab, summary_rows


class Command(NamedTuple):
    """A sub-command: its config (the fields give the flags), what runs it, and its help (short, then long)."""

    config: type
    run: Callable[[Any], None]
    short: str
    long: str


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


def run_attack_command(cfg: AttackRunConfig) -> None:
    """Attack every model, then one line each: answered without a suffix and after the largest budget."""
    result = run_attack(cfg)
    top = str(max(cfg.budgets))
    for name, m in result["models"].items():
        print(f"{name}: answered {m['answered']['plain']['rate']:.2f} plain, {m['answered'][top]['rate']:.2f} after "
              f"{top} attack steps (n={m['answered'][top]['n']})")
    print(f"Report: {cfg.out}/report.md")


COMMANDS = {
    "compare": Command(CompareConfig, run_compare, "tau per layer and weight changes of a before/after pair",
                       "tau per layer (safe / unsafe / jailbreak prompts) before and after, and the weight change of "
                       "every projection matrix; writes mechanistic.json, report.md, tau.png, weights.png, run.json"),
    "synthetic": Command(LabConfig, run_synthetic,
                         "the synthetic lab: pre-train, SSFT / DPO / unlearning, analyse, attack",
                         "PCFG text x bijective operators; pre-train a small minisafe model, safety fine-tune it with "
                         "train.py's sft, dpo and unlearn objectives, then measure behaviour, tau and weight changes, "
                         "and attack it with optimised embeddings; writes results.json, report.md, tau.png, "
                         "attack.png"),
    "attack": Command(AttackRunConfig, run_attack_command,
                      "the continuous-embedding attack on real models: success rate and tau per layer",
                      "optimise a soft suffix of free embedding vectors towards a compliant opening on held-out "
                      "malicious prompts; judge the greedy continuations like R_h and score the attacked inputs with "
                      "tau per layer; writes results.json, responses.jsonl, report.md, tau.png, attack.png, run.json"),
}


def parse_args(argv: list[str] | None = None) -> tuple[Command, Any]:
    """The sub-command of a command line and its config (the sub-command's fields give the flags)."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        add_options(sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, help=command.short,
                                   description=command.long), command.config)
    a = p.parse_args(argv)
    command = COMMANDS[a.command]
    return command, config_from_args(command.config, a)


@script("mechanistic.py")
def main(argv: list[str] | None = None) -> int:
    """Parse, run the sub-command, summarise; exit 2 with one line naming the culprit for a user error."""
    command, cfg = parse_args(argv)
    command.run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
