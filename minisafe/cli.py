"""What the command-line scripts share: a parser whose every complaint is one ConfigError, and argparse types that
check each numeric, layer-range, device and output-directory flag where it is parsed, once, so no bad value reaches the
library. A type's message is prefixed by argparse with the flag ("argument --alpha: ...")."""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from minisafe.errors import ConfigError
from minisafe.freeze import parse_layer_range


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises ConfigError, which the scripts print as one line and exit 2 on,
    like any other user error (argparse's own handler prints the usage block first)."""

    def error(self, message: str) -> None:
        raise ConfigError(message)


def whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(minimum: float | None = None, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number, at least `minimum` (greater than it with `above`) when one is given."""
    bound = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}") from None
        low = minimum is not None and (value <= minimum if above else value < minimum)
        if not math.isfinite(value) or low:
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}")
        return value

    parse.__name__ = f"number{bound}"
    return parse


positive_int = whole(1)
non_negative_int = whole(0)
finite_float = number()
positive_float = number(0, above=True)
non_negative_float = number(0)


def layer_range(text: str) -> tuple[int, int]:
    """An argparse type: FIRST:LAST, 0-based and inclusive, FIRST <= LAST (the model's size is checked on loading)."""
    try:
        return parse_layer_range(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device(text: str) -> str:
    """An argparse type: cpu, or a CUDA device this machine has (cuda, cuda:1, ...)."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda (or cuda:N), got {text!r}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def output_dir(text: str) -> str:
    """An argparse type: a directory that exists and is writable, or that can be created; checked by writing a
    temporary file into it (or into its nearest existing parent), because permission bits do not bind every user."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text} cannot be created: {existing} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".minisafe-write-check."):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text} is not writable ({existing}: {e.strerror or e})") from None
    return text
