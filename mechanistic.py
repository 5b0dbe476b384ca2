"""What safety fine-tuning changes inside a model (Jain et al., NeurIPS 2024): compare two checkpoints, run the
synthetic task-concept lab, or attack models with optimised input embeddings.

    python mechanistic.py compare --before DIR --after DIR --out DIR [--layers I:J] [--template chat|alpaca]
    python mechanistic.py synthetic --out DIR
    python mechanistic.py attack --model DIR [--model DIR ...] --out DIR [--budgets 20 100] [--layers I:J]
"""

import argparse
import sys

from minisafe.attacks import AttackRunConfig, run_attack
from minisafe.cli import (Parser, device, non_negative_float, non_negative_int, output_dir, positive_float,
                          positive_int, whole)
from minisafe.errors import MinisafeError
from minisafe.mechanistic import RANK_RTOL, TOP_K, CompareConfig, compare, separation
from minisafe.synthetic import LabConfig, ModelSize, run_lab, summary_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_compare_parser(sub)
    add_synthetic_parser(sub)
    add_attack_parser(sub)
    return p.parse_args(argv)


def add_compare_parser(sub) -> None:
    """The compare subcommand: tau and weight changes of a before / after pair."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    c = sub.add_parser("compare", formatter_class=fmt, help="tau per layer and weight changes of a before/after pair",
                       description="tau per layer (safe / unsafe / jailbreak prompts) before and after, and the "
                                   "weight change of every projection matrix; writes mechanistic.json, report.md, "
                                   "tau.png, weights.png, run.json")
    c.add_argument("--before", required=True, help="Hugging Face model directory before fine-tuning")
    c.add_argument("--after", required=True, help="Hugging Face model directory after fine-tuning (same tensor names)")
    c.add_argument("--out", required=True, type=output_dir, help="output directory")
    c.add_argument("--safe", help="safe prompts (txt/csv/json/jsonl); default: the bundled normal instructions")
    c.add_argument("--unsafe", help="malicious prompts (AdvBench CSV works as is); default: fetched HarmBench")
    c.add_argument("--layers", metavar="I:J",
                   help="safety layers to shade in the plots: FIRST:LAST (0-based, inclusive) or a safety_layers.json")
    c.add_argument("--template", choices=["chat", "alpaca"], default="chat",
                   help="prompt format: the model's own chat template or the Alpaca template")
    c.add_argument("--limit", type=whole(2),
                   help="at most N evaluated prompts per set, and N reference prompts per kind")
    c.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass")
    c.add_argument("--top-k", type=positive_int, default=TOP_K,
                   help="top singular vectors of dW weighed in the null-space share")
    c.add_argument("--rank-rtol", type=non_negative_float, default=RANK_RTOL,
                   help="singular values of W_before below this times the largest do not count towards its span")
    c.add_argument("--seed", type=non_negative_int, default=0, help="seed of the reference / evaluated split")
    c.add_argument("--device", default="cpu", type=device, help="cpu or cuda")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_synthetic_parser(sub) -> None:
    """The synthetic subcommand: the task-concept lab, its embedding attack included."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("synthetic", formatter_class=fmt, help="the synthetic lab: pre-train, SSFT / DPO / unlearning, "
                                                              "analyse",
                       description="PCFG text x bijective operators; pre-train a small minisafe model, safety "
                                   "fine-tune it with train.py's sft, dpo and unlearn objectives, then measure "
                                   "behaviour, tau and weight changes; writes results.json, report.md, tau.png")
    d = LabConfig(out="")
    s.add_argument("--out", required=True, type=output_dir, help="output directory (must not exist or be empty)")
    s.add_argument("--seed", type=non_negative_int, default=d.seed,
                   help="seed of the world, the data, the model and training")
    s.add_argument("--n-layers", type=positive_int, default=d.size.layers, help="decoder layers")
    s.add_argument("--heads", type=positive_int, default=d.size.heads, help="attention heads")
    s.add_argument("--width", type=positive_int, default=d.size.width, help="hidden size")
    s.add_argument("--mlp", type=positive_int, default=d.size.mlp, help="MLP hidden size")
    s.add_argument("--pretrain-samples", type=positive_int, default=d.pretrain_samples, help="pre-training samples")
    s.add_argument("--pretrain-epochs", type=positive_int, default=d.pretrain_epochs, help="pre-training epochs")
    s.add_argument("--pretrain-lr", type=positive_float, default=d.pretrain_lr, help="pre-training peak learning rate")
    s.add_argument("--safety-samples", type=positive_int, default=d.safety_samples, help="safety fine-tuning samples")
    s.add_argument("--safety-epochs", type=positive_int, default=d.safety_epochs, help="safety fine-tuning epochs")
    s.add_argument("--safety-lr", type=positive_float, default=d.safety_lr,
                   help="safety fine-tuning peak learning rate of sft and unlearn")
    s.add_argument("--dpo-lr", type=positive_float, default=d.dpo_lr,
                   help="DPO peak learning rate (own default, picked on a validation draw: at the shared --safety-lr "
                        "DPO diverged)")
    s.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="samples per optimizer step")
    s.add_argument("--beta", type=positive_float, default=d.beta, help="DPO beta")
    s.add_argument("--unlearn-weight", type=non_negative_float, default=d.unlearn_weight,
                   help="unlearning: weight of the gradient ascent on the rejected output")
    s.add_argument("--eval-samples", type=positive_int, default=d.eval_samples, help="samples per evaluation set")
    s.add_argument("--reference-samples", type=positive_int, default=d.reference_samples,
                   help="safe and unsafe samples behind the cluster means of tau")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype,
                   help="autocast dtype of training (weights stay float32)")
    s.add_argument("--attack-samples", type=int, default=d.attack_samples,
                   help="unsafe evaluation samples the embedding attack runs on, per safety fine-tuned model (0: none)")
    s.add_argument("--attack-budgets", type=int, nargs="+", default=list(d.attack_budgets), metavar="STEPS",
                   help="Adam step budgets of the embedding attack (success is reported within each)")
    s.add_argument("--attack-slots", type=int, default=d.attack_slots, help="free embedding vectors of the attack")
    s.add_argument("--attack-lr", type=float, default=d.attack_lr,
                   help="the attack's Adam step, in units of the embedding matrix's root-mean-square entry")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_attack_parser(sub) -> None:
    """The attack subcommand: the embedding attack on real models, judged like R_h, with tau per layer."""
    d = AttackRunConfig(models=[], out="")
    a = sub.add_parser("attack", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="the continuous-embedding attack on real models: success rate and tau per layer",
                       description="optimise a soft suffix of free embedding vectors towards a compliant opening on "
                                   "held-out malicious prompts; judge the greedy continuations like R_h and score "
                                   "the attacked inputs with tau per layer; writes results.json, responses.jsonl, "
                                   "report.md, tau.png, attack.png, run.json")
    a.add_argument("--model", dest="models", action="append", required=True,
                   help="Hugging Face model directory; repeat the flag to attack several models")
    a.add_argument("--out", required=True, type=output_dir, help="output directory")
    a.add_argument("--malicious", help="malicious prompts (any format minisafe reads); default: the HarmBench test "
                                       "split that eval.py's R_h uses. Half are attacked, half build tau's unsafe mean")
    a.add_argument("--safe", help="normal prompts for tau's safe mean and safe set; default: the bundled normal ones")
    a.add_argument("--layers", metavar="I:J",
                   help="safety layers to shade in the tau plot: FIRST:LAST (0-based, inclusive) or a "
                        "safety_layers.json")
    a.add_argument("--budgets", type=int, nargs="+", default=list(d.budgets), metavar="STEPS",
                   help="Adam step budgets; success is reported within each (0 steps, the random suffix, always)")
    a.add_argument("--target", default=d.target, help="the opening the attack makes greedy decoding write")
    a.add_argument("--slots", type=positive_int, default=d.slots, help="free embedding vectors in the soft suffix")
    a.add_argument("--lr", type=positive_float, default=d.lr,
                   help="Adam step, in units of the embedding matrix's root-mean-square entry")
    a.add_argument("--limit", type=int, default=d.limit,
                   help="at most N attacked prompts (and reference prompts per kind)")
    a.add_argument("--template", choices=["chat", "alpaca"], default=d.template,
                   help="prompt format: the model's own chat template or the Alpaca template")
    a.add_argument("--judge", default=d.judge, help="refusal judge: 'keywords' or a judge model directory")
    a.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens, help="greedy tokens the judge reads")
    a.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="prompts per forward pass")
    a.add_argument("--seed", type=non_negative_int, default=d.seed, help="seed of the suffixes' start and the reference split")
    a.add_argument("--device", default=d.device, type=device, help="cpu or cuda")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run_compare(a: argparse.Namespace) -> None:
    cfg = CompareConfig(before=a.before, after=a.after, out=a.out, safe=a.safe, unsafe=a.unsafe, layers=a.layers,
                        template=a.template, limit=a.limit, batch_size=a.batch_size, top_k=a.top_k,
                        rank_rtol=a.rank_rtol, seed=a.seed, device=a.device, progress=not a.no_progress)
    result = compare(cfg)
    for which in ("before", "after"):
        print(f"tau separation (safe - unsafe) per layer, {which}: "
              + " ".join(f"{x:.2f}" for x in separation(result["tau"][which])))
    print(f"Report: {a.out}/report.md")


def run_synthetic(a: argparse.Namespace) -> None:
    cfg = LabConfig(out=a.out, seed=a.seed, size=ModelSize(a.n_layers, a.heads, a.width, a.mlp),
                    pretrain_samples=a.pretrain_samples, pretrain_epochs=a.pretrain_epochs, pretrain_lr=a.pretrain_lr,
                    safety_samples=a.safety_samples, safety_epochs=a.safety_epochs, safety_lr=a.safety_lr,
                    dpo_lr=a.dpo_lr, batch_size=a.batch_size, beta=a.beta, unlearn_weight=a.unlearn_weight,
                    eval_samples=a.eval_samples, reference_samples=a.reference_samples, dtype=a.dtype,
                    attack_samples=a.attack_samples, attack_budgets=tuple(a.attack_budgets),
                    attack_slots=a.attack_slots, attack_lr=a.attack_lr, progress=not a.no_progress)
    results = run_lab(cfg)
    print("\n".join(summary_rows(results)))
    print(f"Wall time {results['timings']['total_s']:.0f} s. Report: {a.out}/report.md")


def run_attack_command(a: argparse.Namespace) -> None:
    cfg = AttackRunConfig(models=a.models, out=a.out, malicious=a.malicious, safe=a.safe, layers=a.layers,
                          budgets=tuple(a.budgets), target=a.target, slots=a.slots, lr=a.lr, limit=a.limit,
                          template=a.template, judge=a.judge, max_new_tokens=a.max_new_tokens,
                          batch_size=a.batch_size, seed=a.seed, device=a.device, progress=not a.no_progress)
    result = run_attack(cfg)
    top = str(max(cfg.budgets))
    for name, m in result["models"].items():
        print(f"{name}: answered {m['answered']['plain']['rate']:.2f} plain, {m['answered'][top]['rate']:.2f} after "
              f"{top} attack steps (n={m['answered'][top]['n']})")
    print(f"Report: {a.out}/report.md")


COMMANDS = {"compare": run_compare, "synthetic": run_synthetic, "attack": run_attack_command}


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse_args(argv)
        COMMANDS[a.command](a)
    except MinisafeError as e:
        print(f"mechanistic.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
