"""Find the safety layers of a checkpoint: per-layer cosine analysis, then the over-rejection scaling search.

Bad input stops the run with one line "error: ..." and exit code 2, leaving no half-written file: an --out that cannot
be written, a checkpoint with NaN or inf weights, a prompt longer than the model's context (prompts are never cut).
"""

import argparse
import sys

from minisafe.cli import (Parser, device, layer_range, non_negative_int, output_dir, positive_float, positive_int,
                          whole)
from minisafe.errors import MinisafeError
from minisafe.locate import LocateConfig, run_locate

AUTO_ALPHAS = ("auto", "auto-down")


def alpha_value(text: str) -> str | float:
    """--alpha: 'auto', 'auto-down', or a finite scaling factor > 0 other than 1 (which would scale nothing)."""
    if text in AUTO_ALPHAS:
        return text
    try:
        value = positive_float(text)
    except argparse.ArgumentTypeError:
        value = None
    if value is None or value == 1:
        raise argparse.ArgumentTypeError(f"must be 'auto', 'auto-down' or a finite scaling factor > 0 other than 1 "
                                         f"(1 scales nothing), got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> LocateConfig:
    p = Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    p.add_argument("--out", required=True, type=output_dir,
                   help="output directory for cosine.json/png, safety_layers.json, report.md")
    p.add_argument("--normal", help="normal prompts (txt/csv/json/jsonl); default: the bundled normal instructions")
    p.add_argument("--malicious", help="malicious prompts (AdvBench CSV works as is); default: fetched HarmBench")
    p.add_argument("--over-rejection", help="benign prompts with dangerous-sounding words; default: the bundled set")
    p.add_argument("--n-prompts", type=whole(2), default=100,
                   help="P = Q: normal and malicious prompts sampled (seeded)")
    p.add_argument("--n-over-rejection", type=positive_int, metavar="N",
                   help="score a seeded sample of N over-rejection prompts in the scaling search (default: all)")
    p.add_argument("--pairs", type=whole(2), default=500, help="random pairs drawn per type (N-N, N-M, M-M)")
    p.add_argument("--template", choices=["alpaca", "chat"], default="alpaca",
                   help="prompt format: the paper's Alpaca template or the model's own chat template")
    p.add_argument("--center", action="store_true",
                   help="also analyse after subtracting each layer's mean vector; the range is read off that curve")
    p.add_argument("--initial", metavar="I:J", type=layer_range,
                   help="initial range (0-based, inclusive) instead of the gap-curve rule")
    p.add_argument("--alpha", default="auto", type=alpha_value,
                   help="scaling factor (> 0, not 1), or 'auto' (step by 0.05 above 1 until R_o moves clearly), "
                        "or 'auto-down'")
    p.add_argument("--sweep", type=non_negative_int, default=2, help="each bound is swept over +-SWEEP layers")
    p.add_argument("--skip-scaling", action="store_true", help="cosine analysis only; no over-rejection search")
    p.add_argument("--no-scale-o-proj", action="store_true",
                   help="leave o_proj unscaled, as the paper-era script effectively did")
    p.add_argument("--max-new-tokens", type=positive_int, default=16,
                   help="greedy tokens generated per over-rejection prompt")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts per forward pass")
    p.add_argument("--device", default="cpu", type=device, help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and activations")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the prompt sample and the pairs")
    p.add_argument("--judge", default="keywords", help="refusal judge: 'keywords' or a judge model directory")
    a = p.parse_args(argv)
    alpha = None if a.alpha in AUTO_ALPHAS else a.alpha
    return LocateConfig(
        model=a.model, out=a.out, normal=a.normal, malicious=a.malicious, over_rejection=a.over_rejection,
        n_prompts=a.n_prompts, n_over_rejection=a.n_over_rejection, pairs=a.pairs, template=a.template, center=a.center,
        initial=a.initial, alpha=alpha, alpha_down=a.alpha == "auto-down",
        sweep=a.sweep, skip_scaling=a.skip_scaling, scale_o_proj=not a.no_scale_o_proj,
        max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, device=a.device, dtype=a.dtype, seed=a.seed,
        judge=a.judge)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        result = run_locate(cfg)
    except MinisafeError as e:
        print(f"locate.py: error: {e}", file=sys.stderr)
        return 2
    if result.get("first") is None:
        print(f"No gap in the cosine analysis; see {cfg.out}/report.md")
    else:
        searched = f" (alpha {result['alpha']}, baseline R_o {result['baseline_refusals']})" if result.get("alpha") else ""
        print(f"Safety layers: {result['first']}:{result['last']}{searched}; initial {result['initial']} "
              f"from {result['initial_from']}. Report: {cfg.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
