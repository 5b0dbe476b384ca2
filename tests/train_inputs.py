"""Inputs of the training and audit tests: a tiny random model and a few short sft rows, in one folder."""

import json
from pathlib import Path

from tiny import save_tiny


def write_inputs(root: Path, n_rows: int = 8) -> Path:
    """root/model (a tiny llama) and root/data.jsonl (n_rows prompt / response rows); returns root."""
    save_tiny(root / "model", "llama")
    rows = [{"prompt": f"question {i}", "response": f"answer {i} here"} for i in range(n_rows)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
