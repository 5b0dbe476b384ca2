"""Figures people look at: the per-layer cosine curves and angle gap with the safety layers shaded."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from minisafe.io import atomic_file  # noqa: E402

# The pair types of the cosine analysis (minisafe.locating.PAIR_TYPES), each with its colour.
COLOURS = {"N-N": "tab:blue", "N-M": "tab:red", "M-M": "tab:green"}


def plot_cosine(analyses: dict[str, dict], path: str | Path, title: str, located: tuple[int, int] | None = None,
                initial: tuple[int, int] | None = None) -> None:
    """One column per analysis (e.g. raw, centred): cosine mean +- std per pair type on top, the angle gap below."""
    fig, axes = plt.subplots(2, len(analyses), figsize=(6 * len(analyses), 7), squeeze=False, sharex=True)
    for col, (name, result) in enumerate(analyses.items()):
        top, bottom = axes[0, col], axes[1, col]
        layers = range(len(result["gap"]))
        for kind in COLOURS:
            mean, std = result[kind]["mean"], result[kind]["std"]
            top.plot(layers, mean, label=kind, color=COLOURS[kind])
            top.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             color=COLOURS[kind], alpha=0.15)
        top.set_title(f"{title}: {name} cosine similarity")
        top.set_ylabel("cosine similarity (last token)")
        top.legend()
        bottom.plot(layers, result["gap"], color="black", marker=".")
        bottom.axhline(0, color="grey", linewidth=0.5)
        bottom.set_ylabel("angle gap N-M minus N-N (degrees)")
        bottom.set_xlabel("layer (0-based)")
        for ax in (top, bottom):
            if initial is not None:
                ax.axvspan(initial[0] - 0.5, initial[1] + 0.5, color="orange", alpha=0.12,
                           label="initial range" if ax is bottom else None)
            if located is not None:
                ax.axvspan(located[0] - 0.5, located[1] + 0.5, color="tab:purple", alpha=0.18,
                           label="safety layers" if ax is bottom else None)
        if initial is not None or located is not None:
            bottom.legend()
    save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    """Write a figure atomically (a reader never sees half a PNG) and close it."""
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix[1:] or "png")
    finally:
        plt.close(fig)
