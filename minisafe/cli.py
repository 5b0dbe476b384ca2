"""The command line, declared once. A config dataclass field declared with `option(...)` is also a flag: its help,
argparse type (a check below) and choices live in the field's metadata; add_options builds the parser from the fields,
config_from_args builds the config back, and check_fields applies the same checks to a config made in Python. Every
complaint is one ConfigError naming the flag ("--lr must be a finite number > 0, got 'nan'"); a main decorated with
script() prints it as one "error: ..." line and exits 2, like any other user error."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from minisafe.errors import ConfigError, MinisafeError
from minisafe.freeze import parse_layer_range

OPTION = "minisafe.cli"  # the field-metadata key of an option
GROUP = "minisafe.cli.group"  # the field-metadata key of a nested config whose fields are options too


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises ConfigError, worded "--flag <what is wrong>", which the scripts print
    as one line and exit 2 on, like any other user error (argparse's own handler prints the usage block first)."""

    def error(self, message: str) -> None:
        raise ConfigError(re.sub(r"^argument (-\S+): ", r"\1 ", message))


Main = Callable[[list[str] | None], int]


def script(prog: str = "") -> Callable[[Main], Main]:
    """Decorate a command's main(argv) (parse, one library call, a short summary, the exit code): a MinisafeError it
    raises becomes one line "prog: error: ..." on stderr and exit code 2."""

    def decorate(body: Main) -> Main:
        @functools.wraps(body)
        def main(argv: list[str] | None = None) -> int:
            try:
                return body(argv)
            except MinisafeError as e:
                print(f"{prog + ': ' if prog else ''}error: {e}", file=sys.stderr)
                return 2
        return main
    return decorate


# ---------------------------------------------------------------- argparse types: the value checks


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


def number(minimum: float | None = None, above: bool = False, below: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number, at least `minimum` (greater than it with `above`) and less than `below`
    when they are given."""
    bound = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"
    bound += "" if below is None else f"{' and' if bound else ''} < {below:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}") from None
        low = minimum is not None and (value <= minimum if above else value < minimum)
        if not math.isfinite(value) or low or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}")
        return value

    parse.__name__ = f"number{bound}"
    return parse


positive_int = whole(1)
non_negative_int = whole(0)
finite_float = number()
positive_float = number(0, above=True)
non_negative_float = number(0)
fraction = number(0, below=1)  # a share that may be 0 but not all
share = number(0, above=True, below=1)  # a point strictly inside (0, 1)


def choice(options: Sequence[str]) -> Callable[[str], str]:
    """An argparse type: one of `options`."""

    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(options)}, got {text!r}")
        return text

    parse.__name__ = "choice"
    return parse


def layer_range(text: str) -> tuple[int, int]:
    """An argparse type: FIRST:LAST, 0-based and inclusive, FIRST <= LAST (the model's size is checked on loading)."""
    try:
        return parse_layer_range(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_name(text: str) -> str:
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



def output_file(text: str) -> str:
    """An argparse type: a file path that is not a directory, in a directory output_dir accepts."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    try:
        output_dir(str(Path(text).parent))
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text}: its directory {e}") from None
    return text


# ---------------------------------------------------------------- flags from dataclass fields


def option(default: Any = dataclasses.MISSING, help: str = "", type: Callable[[str], Any] | None = None,
           choices: Sequence[str] | None = None, flag: str | None = None,
           to_fields: Callable[[Any], dict[str, Any]] | None = None, default_factory: Any = dataclasses.MISSING,
           **argparse_kwargs: Any) -> Any:
    """A config field that is also a command-line option: dataclasses.field with the flag's help, check (`type`, or
    one of `choices`) and name (`flag`, else made from the field's) in its metadata. `to_fields` maps the parsed value
    to config fields when the flag is not one field; the rest (metavar, nargs, action, positional, cli_default) goes
    to add_argument."""
    check = type if type is not None or choices is None else choice(choices)
    spec = dict(help=help, type=check, choices=choices, flag=flag, to_fields=to_fields, **argparse_kwargs)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={OPTION: spec})


def group(config: type) -> Any:
    """A config field holding a nested config (made by `config()`) whose own fields are options."""
    return dataclasses.field(default_factory=config, metadata={GROUP: True})


def flag_of(f: dataclasses.Field) -> str:
    """The command-line name of an option field: its `flag`, else --field-name (bools defaulting to True: --no-...)."""
    spec = f.metadata[OPTION]
    if spec["flag"]:
        return spec["flag"]
    negative = f.default is True
    return f"--{'no-' if negative else ''}{f.name.replace('_', '-')}"


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """One argparse flag (or positional) per option field of `config`, nested groups included."""
    for f in dataclasses.fields(config):
        if GROUP in f.metadata:
            add_options(parser, f.default_factory)
        elif OPTION in f.metadata:
            add_field(parser, f)


def add_field(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """The add_argument call of one option field."""
    spec = dict(f.metadata[OPTION])
    name, help, check = flag_of(f), spec.pop("help"), spec.pop("type")
    spec.pop("flag"), spec.pop("to_fields")
    if f.type in ("bool", bool) and "action" not in spec:
        parser.add_argument(name, dest=f.name, action="store_false" if f.default is True else "store_true",
                            help=help)
        return
    default = spec.pop("cli_default", f.default)
    if spec.pop("positional", False):
        parser.add_argument(f.name, type=check, help=help, **spec)
        return
    required = default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if default is dataclasses.MISSING:
        default = None if required else f.default_factory()
    parser.add_argument(name, dest=f.name, type=check, default=default, required=required, help=help, **spec)


def config_from_args(config: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The `config` a parsed command line asks for; `extra` sets fields that are not options (the command, ...)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if GROUP in f.metadata:
            values[f.name] = config_from_args(f.default_factory, args)
        elif OPTION in f.metadata:
            value = getattr(args, f.name)
            to_fields = f.metadata[OPTION]["to_fields"]
            if to_fields is not None:
                values.update(to_fields(value))
            else:
                values[f.name] = tuple(value) if isinstance(value, list) and isinstance(f.default, tuple) else value
    return config(**values, **extra)


def parse_config(config: type, argv: list[str] | None, description: str | None = None, prog: str | None = None,
                 **extra: Any) -> Any:
    """Parse argv into `config` with a parser built from its fields (each flag's default shown in --help); a config
    with a `command` field records the command line given as argv there."""
    parser = Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_options(parser, config)
    if argv is not None and "command" in {f.name for f in dataclasses.fields(config)}:
        extra.setdefault("command", [parser.prog, *argv])
    return config_from_args(config, parser.parse_args(argv), **extra)


def check_fields(cfg: Any) -> None:
    """Apply every option's check to the value a config holds (a config made in Python skips argparse): a
    ConfigError worded as on the command line otherwise."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if GROUP in f.metadata:
            check_fields(value)
        if OPTION not in f.metadata or f.metadata[OPTION]["type"] is None or value is None or isinstance(value, bool):
            continue
        for item in value if f.metadata[OPTION].get("nargs") or f.metadata[OPTION].get("action") else [value]:
            try:
                f.metadata[OPTION]["type"](as_text(item))
            except argparse.ArgumentTypeError as e:
                raise ConfigError(f"{flag_of(f)} {e}") from None


def as_text(value: Any) -> str:
    """How a value is written on the command line (a layer range as FIRST:LAST)."""
    if isinstance(value, tuple):
        return ":".join(str(x) for x in value)
    return value if isinstance(value, str) else str(value)
