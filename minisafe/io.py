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

MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja")  # the files that make a model directory what it is


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the file to; on success it replaces `path`, so a reader sees the
    old file or the whole new one, never half of it; on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file owner-only; give it the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_copy(source: str | Path, target: str | Path) -> None:
    """Copy a file atomically (atomic_file)."""
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)


def _umask() -> int:
    """This process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write a JSON file atomically, indented, non-ASCII kept."""
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
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(path: str | Path, suffixes: tuple[str, ...] | None = MODEL_FILE_SUFFIXES, recursive: bool = False,
                exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of each file of a directory, by relative path in sorted order: its top level unless `recursive`, only
    names ending in one of `suffixes` (None: every file), none whose path has a part named in `exclude`."""
    root = Path(path)
    files = sorted(f for f in (root.rglob("*") if recursive else root.iterdir()) if f.is_file())
    return {str(f.relative_to(root)): sha256_file(f) for f in files
            if (suffixes is None or f.suffix in suffixes) and not set(f.relative_to(root).parts) & set(exclude)}


def content_hash(path: str | Path, suffixes: tuple[str, ...] | None = MODEL_FILE_SUFFIXES, recursive: bool = False,
                 exclude: tuple[str, ...] = ()) -> str:
    """sha256 of a file, or of a directory's files as file_hashes picks them (names and contents, sorted); by default
    the weight, tokenizer and config files at its top level, which is what identifies a model."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for name, digest in file_hashes(path, suffixes, recursive, exclude).items():
        h.update(name.encode() + b"\0" + digest.encode())
    return h.hexdigest()


def machine() -> dict:
    """What the numbers were measured on: the CPU model, its core count, the operating system."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:  # not Linux: platform.processor() is the best there is
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


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
