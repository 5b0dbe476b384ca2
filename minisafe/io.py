"""Atomic file and directory writes, and content hashes: what every run records and every writer uses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that a reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file owner-only; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the directory owner-only
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists")
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """Parsed JSON of an optional file (None when absent); invalid JSON raises `error` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a directory's weight, tokenizer and config files (names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".jinja")):
        h.update(file.name.encode() + b"\0" + sha256_file(file).encode())
    return h.hexdigest()


def run_record(seed: int, inputs: dict[str, str | Path | None], **settings: Any) -> dict[str, Any]:
    """What a run decided, to be written beside its results: command line, seed, versions, input hashes, settings."""
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "versions": {"python": platform.python_version(),
                     **{pkg: version(pkg) for pkg in ("torch", "numpy", "tokenizers", "safetensors")}},
        "inputs": {name: {"path": str(p), "sha256": content_hash(p)} for name, p in inputs.items() if p is not None},
        "settings": settings,
    }
