"""Evaluate checkpoints: harmful rate R_h, over-rejection R_o, and utility (ROUGE-L, perplexity), side by side.

Bad input stops the run with one line "error: ..." and exit code 2, leaving no half-written file: an --out that cannot
be written, a checkpoint with NaN or inf weights, a prompt longer than the model's context (prompts are never cut).
"""

import argparse
import sys

from minisafe.cli import Parser, device, non_negative_int, output_dir, positive_int
from minisafe.errors import MinisafeError
from minisafe.evaluate import EvalConfig, run_eval, summary

SET_HELP = "; a dataset file (txt/csv/json/jsonl/ShareGPT) or 'none' to skip"


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="Hugging Face model directory (safetensors); repeat the flag to compare several models")
    p.add_argument("--out", required=True, type=output_dir,
                   help="output directory for results.json, responses.jsonl, report.md")
    p.add_argument("--harmful", metavar="F",
                   help="malicious prompts (AdvBench CSV works as is); default: the HarmBench test split" + SET_HELP)
    p.add_argument("--over-rejection", metavar="F",
                   help="benign prompts with dangerous-sounding words; default: the bundled set" + SET_HELP)
    p.add_argument("--utility", metavar="F",
                   help="normal prompt/response pairs; default: held-out ShareGPT pairs" + SET_HELP)
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="greedy tokens generated per prompt")
    p.add_argument("--limit", type=positive_int, help="evaluate a seeded sample of at most N prompts of each set")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass")
    p.add_argument("--template", choices=["chat", "alpaca"], default="chat",
                   help="prompt format: the model's own chat template or the paper's Alpaca template")
    p.add_argument("--judge", default="keywords",
                   help="refusal judge: 'keywords', 'probe:FILE' (a linear probe from minisafe.judge_probe) or a local chat "
                        "model directory asked a yes/no question")
    p.add_argument("--refusal-phrases", metavar="F",
                   help="extra refusal openings for the keyword judge, one a line ('#' comments allowed)")
    p.add_argument("--examples", type=non_negative_int, default=1,
                   help="example responses per set and verdict in report.md")
    p.add_argument("--device", default="cpu", type=device, help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and activations")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the --limit sample (decoding is greedy)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    a = p.parse_args(argv)
    return EvalConfig(models=a.model, out=a.out, harmful=a.harmful, over_rejection=a.over_rejection,
                      utility=a.utility, max_new_tokens=a.max_new_tokens, limit=a.limit, batch_size=a.batch_size,
                      template=a.template, judge=a.judge, refusal_phrases=a.refusal_phrases, device=a.device,
                      dtype=a.dtype, seed=a.seed, examples=a.examples, progress=not a.no_progress,
                      command=["eval.py", *argv] if argv is not None else None)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        results = run_eval(cfg)
    except MinisafeError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary(results)))
    print(f"Judge: {results['judge']}. Report: {cfg.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
