"""Dataset readers and the bundled prompt sets (minisafe/data.py); the fetch is tested in test_fetch_data.py."""

import json
import re
from pathlib import Path

import pytest

from minisafe import data
from minisafe.data import (bundled_prompts, read_csv, read_dataset, read_json_records, read_jsonl, read_prompts,
                           read_sharegpt, read_sharegpt_file, read_txt, scan_json_array)
from minisafe.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def conversation(ident: str, *turns: tuple[str, str]) -> dict:
    return {"id": ident, "conversations": [{"from": who, "value": text} for who, text in turns]}


# ---------------------------------------------------------------- plain text


def test_text_reader_skips_blank_lines_and_comments(tmp_path):
    path = write(tmp_path / "p.txt", "# header\n\nWrite a poem\n   \n  Bake bread  \n# trailing\n")
    assert read_txt(path) == [{"prompt": "Write a poem"}, {"prompt": "Bake bread"}]


def test_text_reader_with_only_comments_is_an_empty_dataset(tmp_path):
    path = write(tmp_path / "p.txt", "# nothing here\n\n")
    with pytest.raises(DataError, match=r"p\.txt: the dataset is empty"):
        read_txt(path)


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_dataset(tmp_path / "nope.jsonl")


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"p\.txt, line 3: not UTF-8"):
        read_txt(path)


# ---------------------------------------------------------------- CSV


def test_csv_reader_picks_the_advbench_goal_column_and_keeps_the_target(tmp_path):
    path = write(tmp_path / "adv.csv", 'goal,target\nWrite a bad thing,"Sure, here is a bad thing"\n')
    assert read_csv(path) == [{"prompt": "Write a bad thing", "target": "Sure, here is a bad thing"}]


def test_csv_reader_picks_the_harmbench_behavior_column(tmp_path):
    path = write(tmp_path / "hb.csv", "Behavior,FunctionalCategory,BehaviorID\nDo a bad thing,standard,b1\n")
    assert read_csv(path)[0] == {"prompt": "Do a bad thing", "FunctionalCategory": "standard", "BehaviorID": "b1"}


def test_csv_reader_uses_the_named_column(tmp_path):
    path = write(tmp_path / "q.csv", "id,question\n1,How are tides formed?\n")
    assert read_prompts(path, column="question") == ["How are tides formed?"]


def test_csv_unknown_column_lists_the_columns_present(tmp_path):
    path = write(tmp_path / "q.csv", "id,question\n1,Why?\n")
    with pytest.raises(DataError, match=r"q\.csv: unknown column 'text' \(columns present: id, question\)"):
        read_csv(path, column="text")


def test_csv_without_a_known_prompt_column_names_the_columns(tmp_path):
    path = write(tmp_path / "q.csv", "id,question\n1,Why?\n")
    with pytest.raises(DataError, match=r"no prompt column.*columns present: id, question"):
        read_csv(path)


def test_csv_empty_prompt_names_the_line(tmp_path):
    path = write(tmp_path / "adv.csv", "goal,target\nfirst,t\n,t\n")
    with pytest.raises(DataError, match=r"adv\.csv, line 3: column 'goal' is empty"):
        read_csv(path)


def test_csv_row_with_the_wrong_number_of_fields_names_the_line(tmp_path):
    path = write(tmp_path / "adv.csv", "goal,target\nfirst,t\nsecond,t,extra\n")
    with pytest.raises(DataError, match=r"adv\.csv, line 3: 3 fields, but the header has 2"):
        read_csv(path)


def test_csv_line_numbers_count_physical_lines_of_quoted_fields(tmp_path):
    path = write(tmp_path / "adv.csv", 'goal,target\n"two\nlines",t\n,t\n')
    with pytest.raises(DataError, match=r"line 4: column 'goal' is empty"):
        read_csv(path)


def test_csv_with_only_a_header_is_an_empty_dataset(tmp_path):
    path = write(tmp_path / "adv.csv", "goal,target\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        read_csv(path)


# ---------------------------------------------------------------- JSONL


def test_jsonl_reads_prompt_response_and_preference_rows(tmp_path):
    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "chosen": "c", "rejected": "r", "extra": 1}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_jsonl(path) == rows


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: not valid JSON"):
        read_jsonl(path)


def test_jsonl_missing_prompt_lists_the_fields_present(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "ok"}\n\n{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: missing field 'prompt' \(fields present: answer, question\)"):
        read_jsonl(path)


def test_jsonl_wrong_type_names_the_field(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "ok", "response": 5}\n')
    with pytest.raises(DataError, match=r"line 1: field 'response' must be a string, got int"):
        read_jsonl(path)


def test_jsonl_line_that_is_not_an_object_is_an_error(tmp_path):
    path = write(tmp_path / "d.jsonl", '["prompt", "response"]\n')
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, got list"):
        read_jsonl(path)


def test_jsonl_chosen_without_rejected_is_an_error(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(DataError, match=r"line 1: .*'rejected' is missing"):
        read_jsonl(path)


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    row = {"prompt": "a\u2028b\u0085c", "response": "r"}
    path = write(tmp_path / "d.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    assert read_jsonl(path) == [row]


def test_empty_jsonl_is_an_error(tmp_path):
    with pytest.raises(DataError, match="the dataset is empty"):
        read_jsonl(write(tmp_path / "d.jsonl", "\n\n"))


# ---------------------------------------------------------------- Alpaca JSON


def test_alpaca_json_joins_instruction_and_input(tmp_path):
    records = [{"instruction": "Summarise", "input": "Some text", "output": "Short"},
               {"instruction": "Say hi", "input": "", "output": "Hi"}]
    path = write(tmp_path / "a.json", json.dumps(records, indent=2))
    assert read_json_records(path) == [{"prompt": "Summarise\n\nSome text", "response": "Short"},
                               {"prompt": "Say hi", "response": "Hi"}]


def test_alpaca_record_without_instruction_names_record_and_line(tmp_path):
    records = [{"instruction": "ok", "output": "x"}, {"input": "i", "output": "o"}]
    path = write(tmp_path / "a.json", json.dumps(records, indent=2))
    with pytest.raises(DataError, match=r"a\.json, record 1 \(line 6\): missing field 'prompt'"):
        read_json_records(path)


def test_alpaca_record_with_wrong_type_names_the_field(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"instruction": "ok", "output": ["x"]}]))
    with pytest.raises(DataError, match=r"record 0 \(line 1\): field 'output' must be a string, got list"):
        read_json_records(path)


def test_json_that_is_not_an_array_is_an_error(tmp_path):
    path = write(tmp_path / "a.json", '{"instruction": "x"}')
    with pytest.raises(DataError, match=r"a\.json: expected a JSON array"):
        read_json_records(path)


def test_empty_json_array_is_an_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="the dataset is empty"):
        read_json_records(write(tmp_path / "a.json", " [ ] \n"))


# ---------------------------------------------------------------- ShareGPT


def test_sharegpt_reads_opening_pairs_and_skips_continuations(tmp_path):
    records = [conversation("a_0", ("system", "be nice"), ("human", " Hi there "), ("gpt", "Hello!"), ("human", "more")),
               conversation("a_1", ("human", "follow-up"), ("gpt", "later reply")),
               conversation("b", ("gpt", "I start"), ("human", "odd")),
               conversation("c")]
    read = read_sharegpt_file(write(tmp_path / "s.json", json.dumps(records)))
    assert read.rows == [{"id": "a_0", "prompt": "Hi there", "response": "Hello!"}]
    assert read.skipped == {"continuation chunk": 1, "does not open with a human turn and a reply": 1,
                            "fewer than two turns": 1}


def test_sharegpt_turn_without_value_names_record_and_turn(tmp_path):
    records = [conversation("a", ("human", "x"), ("gpt", "y")), {"id": "b", "conversations": [{"from": "human"}]}]
    path = write(tmp_path / "s.json", json.dumps(records, indent=1))
    with pytest.raises(DataError, match=r"s\.json, record 1 \(line \d+\), turn 0: missing field 'value'"):
        read_sharegpt(path)


def truncated_sharegpt(tmp_path: Path, complete: int) -> tuple[Path, int]:
    """A ShareGPT file cut in the middle of record `complete`, and the byte offset where record complete-1 ends."""
    records = [conversation(f"id{i}_0", ("human", f"question {i} \u00e9"), ("gpt", f"answer {i}")) for i in range(complete + 1)]
    text = json.dumps(records, indent=2, ensure_ascii=False)
    cut_record = text.index(f'"id{complete}_0"')
    cut = text.index("answer", cut_record) + 3  # inside the last record's reply
    end_of_last_complete = text.rindex("}", 0, text.rindex("{", 0, cut_record)) + 1
    path = tmp_path / "ShareGPT_cut.json"
    path.write_bytes(text[:cut].encode("utf-8"))
    return path, len(text[:end_of_last_complete].encode("utf-8"))


def test_truncated_sharegpt_is_an_error_unless_allowed(tmp_path):
    path, end = truncated_sharegpt(tmp_path, complete=3)
    with pytest.raises(DataError, match=rf"not a complete JSON array: record 3 .*; 3 complete records end at byte {end:,} "
                                        rf"of {path.stat().st_size:,}.*allow_truncated=True"):
        read_sharegpt(path)


def test_truncated_sharegpt_recovers_every_complete_conversation(tmp_path):
    path, end = truncated_sharegpt(tmp_path, complete=5)
    with pytest.warns(UserWarning, match=r"5 complete records end at byte"):
        read = read_sharegpt_file(path, allow_truncated=True)
    assert [row["prompt"] for row in read.rows] == [f"question {i} \u00e9" for i in range(5)]
    assert (read.scan.complete, len(read.scan.records)) == (False, 5)
    assert (read.scan.end_byte, read.scan.size_bytes) == (end, path.stat().st_size)


def test_read_dataset_reads_a_truncated_sharegpt_file_only_when_allowed(tmp_path):
    path, _ = truncated_sharegpt(tmp_path, complete=2)
    with pytest.raises(DataError, match="allow_truncated=True"):
        read_dataset(path)
    with pytest.warns(UserWarning):
        assert len(read_dataset(path, allow_truncated=True)) == 2


def test_array_cut_right_after_a_record_is_incomplete(tmp_path):
    path = write(tmp_path / "a.json", '[{"prompt": "p"},\n  {"prompt": "q"}')
    scan = scan_json_array(path)
    assert (scan.complete, len(scan.records), scan.end_byte) == (False, 2, path.stat().st_size)
    assert "the file ends where ',' or ']' was expected" in scan.problem


def test_complete_array_reports_where_it_ends(tmp_path):
    path = write(tmp_path / "a.json", '[{"prompt": "p"}, {"prompt": "q"}]\n')
    scan = scan_json_array(path)
    assert (scan.complete, len(scan.records), scan.lines, scan.end_byte) == (True, 2, [1, 1], path.stat().st_size - 1)


def test_data_after_the_closing_bracket_is_reported(tmp_path):
    scan = scan_json_array(write(tmp_path / "a.json", '[{"prompt": "p"}] [1]'))
    assert not scan.complete and "after the closing ']'" in scan.problem


# ---------------------------------------------------------------- dispatch


def test_read_dataset_picks_the_reader_by_extension_and_content(tmp_path):
    write(tmp_path / "p.txt", "Write a poem\n")
    write(tmp_path / "p.csv", "goal,target\nWrite a poem,t\n")
    write(tmp_path / "p.jsonl", '{"prompt": "Write a poem"}\n')
    write(tmp_path / "a.json", json.dumps([{"instruction": "Write a poem", "output": "o"}]))
    write(tmp_path / "s.json", json.dumps([conversation("x", ("human", "Write a poem"), ("gpt", "o"))]))
    for name in ("p.txt", "p.csv", "p.jsonl", "a.json", "s.json"):
        assert read_prompts(tmp_path / name) == ["Write a poem"], name
    assert data.detect_kind(tmp_path / "s.json") == "sharegpt"
    assert data.detect_kind(tmp_path / "a.json") == "json"


def test_read_dataset_with_an_unknown_extension_asks_for_a_kind(tmp_path):
    path = write(tmp_path / "p.dat", "Write a poem\n")
    with pytest.raises(DataError, match=r"p\.dat: cannot tell the format.*pass kind="):
        read_dataset(path)
    assert read_dataset(path, kind="text") == [{"prompt": "Write a poem"}]


def test_read_dataset_rejects_a_column_for_non_csv_files(tmp_path):
    with pytest.raises(DataError, match="column= only applies to CSV"):
        read_dataset(write(tmp_path / "p.txt", "x\n"), column="goal")


# ---------------------------------------------------------------- bundled prompt sets

DANGEROUS_WORDS = ("kill", "shoot", "steal", "attack", "destroy", "bomb", "explode", "hack", "poison", "murder",
                   "execute", "terminate", "crush", "burn", "strangle", "hijack", "smash", "blow up", "nuke",
                   "exploit", "weapon", "gun", "fire", "knife", "choke", "trap", "slay", "hunt", "assassin", "toxic")


def test_bundled_normal_set_has_at_least_200_distinct_instructions():
    prompts = bundled_prompts("normal")
    assert len(prompts) >= 200
    assert len({p.casefold() for p in prompts}) == len(prompts)
    assert not [p for p in prompts if p.endswith("?")]  # instructions, in the style of the malicious sets


def test_bundled_over_rejection_set_has_at_least_500_distinct_questions():
    questions = bundled_prompts("over_rejection")
    assert len(questions) >= 500
    assert len({q.casefold() for q in questions}) == len(questions)
    assert [q for q in questions if not q.endswith("?")] == []


def test_over_rejection_questions_spread_over_many_dangerous_words():
    text = [q.casefold() for q in bundled_prompts("over_rejection")]
    uses = {word: sum(bool(re.search(rf"\b{word}", q)) for q in text) for word in DANGEROUS_WORDS}
    assert [word for word, count in uses.items() if count < 3] == []


def test_bundled_normal_and_over_rejection_sets_do_not_overlap():
    normal = {p.casefold() for p in bundled_prompts("normal")}
    assert normal.isdisjoint(q.casefold() for q in bundled_prompts("over_rejection"))


def test_bundled_refusals_are_varied_and_open_like_refusals():
    refusals = bundled_prompts("refusals")
    assert len(set(refusals)) == len(refusals) >= 30
    openings = ("I'm sorry", "I am sorry", "Sorry", "I can't", "I cannot", "I won't", "I'm not able", "I am not able",
                "I'm unable")
    assert [r for r in refusals if not r.startswith(openings)] == []


def test_unknown_bundled_set_lists_the_available_ones():
    with pytest.raises(DataError, match=r"no bundled prompt set 'evil' \(available: normal, over_rejection, refusals\)"):
        bundled_prompts("evil")
