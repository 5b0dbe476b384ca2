"""Fine-tune a checkpoint with chosen layers frozen (SPPFT), or align it with SFT, DPO or unlearning.

Data: JSONL (or any format minisafe.data reads) with {"prompt", "response"} rows for sft and
{"prompt", "chosen", "rejected"} rows for dpo and unlearn. Several processes: torchrun --nproc_per_node N train.py ...
"""

import sys

from minisafe.cli import parse_config, script
from minisafe.training import TrainConfig, train


@script("train.py")
def main(argv: list[str] | None = None) -> int:
    """Train; exit 0 when done, 130 when interrupted, 2 with one line naming the culprit for a user error."""
    cfg = parse_config(TrainConfig, argv, __doc__, prog="train.py")  # the flags are the fields of TrainConfig
    summary = train(cfg)
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
        rows = (f", frozen rows changed: {a['frozen_rows_changed']} of {a['tensors_with_frozen_rows']} tensors"
                if a.get("tensors_with_frozen_rows") else "")
        print(f"Audit: {a['changed']} of {a['tensors']} tensors changed, frozen and changed: {a['frozen_changed']}"
              f"{rows}. Model: {cfg.out}")
    if summary["stopped"] == "max_steps":
        print("Stopped at --max-steps; continue to the end of the schedule with --resume.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
