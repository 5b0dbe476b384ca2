"""Fine-tune a checkpoint with chosen layers frozen (SPPFT), or align it with SFT, DPO or unlearning.

Data: JSONL (or any format minisafe.data reads) with {"prompt", "response"} rows for sft and
{"prompt", "chosen", "rejected"} rows for dpo and unlearn. Several processes: torchrun --nproc_per_node N train.py ...
"""

import argparse
import sys

from minisafe.errors import MinisafeError
from minisafe.train import TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per TrainConfig field."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors) to start from")
    p.add_argument("--data", required=True, help="training data file (jsonl/json/csv; fields as above)")
    p.add_argument("--out", required=True,
                   help="output directory: the fine-tuned model, run.json, train_log.jsonl, audit.json; must not exist "
                        "unless --resume (a run stopped before its first checkpoint is started again)")
    p.add_argument("--objective", choices=["sft", "dpo", "unlearn"], default="sft",
                   help="sft: cross-entropy on the response; dpo: preference optimisation against the starting model; "
                        "unlearn: NLL on chosen minus --unlearn-weight * NLL on rejected")
    p.add_argument("--freeze", metavar="SPEC",
                   help="layers to freeze: 'none', FIRST:LAST (0-based, inclusive, e.g. 6:11), or a safety_layers.json "
                        "written by locate.py")
    p.add_argument("--freeze-scope", choices=["attn_mlp", "all"], default="attn_mlp",
                   help="attn_mlp: the attention and MLP tensors of the frozen layers (the paper's code); "
                        "all: every tensor of those layers, norms included")
    p.add_argument("--trainable", metavar="REGEX", help="only parameters whose name matches REGEX are trainable")
    p.add_argument("--frozen", metavar="REGEX", help="also freeze parameters whose name matches REGEX")
    p.add_argument("--freeze-random-neurons", metavar="N|like:SPEC",
                   help="the paper's NFFT control: freeze seeded random output rows (neurons) of the attention and MLP "
                        "projections, N parameters or like:SPEC (as many as freezing SPEC's layers would, e.g. "
                        "like:13:14 or like:safety_layers.json); combines with the flags above")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch, over all processes together")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (a step sees batch-size * grad-accum examples)")
    p.add_argument("--warmup-steps", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine",
                   help="decay of the learning rate after warm-up, to 0 at the end of the last epoch")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (trainable tensors only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this value; 0 = no clipping")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sequence (prompt + response), cut beyond")
    p.add_argument("--max-steps", type=int,
                   help="stop after this many optimizer steps (saves the model, audit and a checkpoint to --resume "
                        "from; the schedule still spans --epochs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the validation split")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (bfloat16 = autocast; weights and optimizer state stay float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--template", choices=["chat", "alpaca"], default="chat",
                   help="prompt format: the model's own chat template or the paper's Alpaca template")
    p.add_argument("--loss-on-prompt", action="store_true",
                   help="sft: train on the prompt tokens too (as the paper's script did)")
    p.add_argument("--beta", type=float, default=0.1, help="dpo: strength of the pull towards the reference")
    p.add_argument("--unlearn-weight", type=float, default=1.0,
                   help="unlearn: weight of the gradient ascent on the rejected response (unbounded; keep it small)")
    p.add_argument("--val-data", metavar="F", help="validation data file (same fields as --data)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this seeded fraction of --data for validation instead")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validation loss every N steps (0 = at the end only); needs a validation set")
    p.add_argument("--save-every", type=int, default=200,
                   help="training checkpoint every N steps (0 = only at --max-steps and on Ctrl-C)")
    p.add_argument("--snapshots", type=float, nargs="+", default=(), metavar="SHARE",
                   help="also save the model after these shares of the schedule (e.g. 0.25 0.5) as out/snapshot-STEP/, "
                        "to measure how a fine-tune changes the model along the way")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out from its checkpoint (a run that stopped before its "
                        "first checkpoint starts again from step 0)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of "
                        "replicating the model on every process")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line (its values are checked by minisafe.train.check_config)."""
    a = build_parser().parse_args(argv)
    return TrainConfig(
        model=a.model, data=a.data, out=a.out, objective=a.objective, freeze=a.freeze, freeze_scope=a.freeze_scope,
        trainable=a.trainable, frozen=a.frozen,
        freeze_random_neurons=a.freeze_random_neurons, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
        grad_accum=a.grad_accum, warmup_steps=a.warmup_steps, schedule=a.schedule, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, max_len=a.max_len, max_steps=a.max_steps, seed=a.seed, dtype=a.dtype, device=a.device,
        template=a.template, loss_on_prompt=a.loss_on_prompt, beta=a.beta, unlearn_weight=a.unlearn_weight,
        val_data=a.val_data, val_fraction=a.val_fraction, eval_every=a.eval_every, save_every=a.save_every, snapshots=tuple(a.snapshots),
        resume=a.resume, fsdp=a.fsdp, progress=not a.no_progress,
        command=["train.py", *argv] if argv is not None else None)


def main(argv: list[str] | None = None) -> int:
    """Train; exit 0 when done, 130 when interrupted, 2 with one line naming the culprit for a user error."""
    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except MinisafeError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    if not summary["main"]:  # under torchrun, process 0 reports
        return 130 if summary["stopped"] == "interrupted" else 0
    if summary["stopped"] == "interrupted":
        print(f"Interrupted at step {summary['step']}; checkpoint saved. Continue with the same command plus --resume.")
        return 130
    loss = f"{summary['loss']:.4f}" if summary["loss"] is not None else "n/a"
    val = f", validation loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
    print(f"Step {summary['step']}/{summary['total_steps']}: loss {loss}{val}; {summary['tok_per_s'] or 0:.0f} tok/s.")
    if "audit" in summary:
        a = summary["audit"]
        print(f"Audit: {a['changed']} of {a['tensors']} tensors changed, frozen and changed: {a['frozen_changed']}. "
              f"Model: {cfg.out}")
    if summary["stopped"] == "max_steps":
        print("Stopped at --max-steps; continue to the end of the schedule with --resume.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
