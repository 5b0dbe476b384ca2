"""Dataset readers, the bundled prompt sets, and where the fetched datasets are.

Every reader returns a list of dict rows. Each row has a non-empty "prompt"; it may also have
"response", or "chosen" and "rejected" (preference data), plus any extra fields of the source.
A bad row is a DataError naming the file, the line (or record) and what is wrong; so is an empty file.

The bundled datasets (HarmBench, Do-Not-Answer, ShareGPT) are fetched by `python -m tools.fetch_data` into data/.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from minisafe.errors import DataError

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


def record_row(record: Any, where: str) -> dict:
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


def json_lines(path: str | Path) -> list[tuple[str, Any]]:
    """[(where, value)]: the JSON value of each non-blank line, where = "path, line N"; bad JSON is a DataError."""
    path = Path(path)
    values = []
    for number, line in enumerate(text_lines(read_text_file(path)), start=1):
        if line.strip():
            where = f"{path}, line {number}"
            try:
                values.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON: {err.msg} (column {err.colno})") from None
    return values


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object a line with 'prompt' (and optional 'response', or 'chosen' + 'rejected')."""
    return _nonempty([record_row(record, where) for where, record in json_lines(path)], Path(path))


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
    return scan_json_text(read_text_file(path), path)


def scan_json_text(text: str, label: str | Path) -> JsonArray:
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


def read_json_records(path: str | Path, allow_truncated: bool = False) -> list[dict]:
    """A JSON array of Alpaca records (instruction, input, output) or prompt/response records."""
    path = Path(path)
    scan = _json_records(path, allow_truncated)
    rows = [record_row(record, f"{path}, record {i} (line {line})")
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
    return sharegpt_pairs(_json_records(Path(path), allow_truncated), path)


def sharegpt_pairs(scan: JsonArray, label: str | Path) -> ShareGPT:
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
        return "json"  # read_json_records reports what is wrong with it
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
        return (read_json_records if kind == "json" else read_sharegpt)(path, allow_truncated)
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


# ---------------------------------------------------------------- fetched datasets


def fetched(name: str, data_dir: str | Path = "data") -> Path:
    """Path of a fetched dataset (harmbench, donotanswer, sharegpt); a clear error says how to fetch it."""
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not fetched yet; run `python -m tools.fetch_data` (or pass your own file)")
    return path


def default_malicious_path() -> Path:
    """The malicious prompts used when none are given: HarmBench's standard behaviours."""
    return fetched("harmbench")
