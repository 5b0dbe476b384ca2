"""The main job's command line: it names the fetch commands when the model or data are missing, and records itself."""

import json

import pytest

from minisafe import pipeline


def test_pipeline_without_the_bundled_model_names_the_fetch_command(tmp_path, capsys):
    assert pipeline.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")]) == 2
    assert "python -m tools.weights fetch smollm2-135m-instruct" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pipeline_without_the_data_names_the_fetch_command(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert pipeline.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
                          "--out", str(tmp_path / "run")]) == 2
    assert "harmbench.jsonl: not fetched yet; run `python -m tools.fetch_data`" in capsys.readouterr().err


def test_pipeline_records_its_command_in_the_run_directory(tmp_path, monkeypatch):
    for name in ("model", "data"):
        (tmp_path / name).mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("harmbench", "donotanswer", "sharegpt"):
        (tmp_path / "data" / f"{name}.jsonl").write_text('{"prompt": "x"}\n')
    called = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda profile, out, model, data, alignment_only: called.update(
        alignment_only=alignment_only) or tmp_path / "run" / "report.md")
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert pipeline.main(argv) == 0 and called == {"alignment_only": False}
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["command"] == ["python", "-m", "minisafe.pipeline", *argv]
    assert set(record["inputs"]) == {"model", "data"} and record["settings"] == {"profile": "quick"}
    assert pipeline.main([*argv, "--alignment-only"]) == 0 and called == {"alignment_only": True}


def test_an_interrupted_run_leaves_the_record_of_the_report_that_exists(tmp_path, monkeypatch):
    for name in ("model", "data", "run"):
        (tmp_path / name).mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("harmbench", "donotanswer", "sharegpt"):
        (tmp_path / "data" / f"{name}.jsonl").write_text('{"prompt": "x"}\n')
    earlier = {"command": ["python", "-m", "minisafe.pipeline", "--alignment-only"]}
    (tmp_path / "run" / "run.json").write_text(json.dumps(earlier))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("stopped mid-step")

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--profile", "full"]
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv)
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == earlier


def test_a_second_run_on_the_same_directory_stops_before_writing(tmp_path, monkeypatch, capsys):
    for name in ("model", "data"):
        (tmp_path / name).mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("harmbench", "donotanswer", "sharegpt"):
        (tmp_path / "data" / f"{name}.jsonl").write_text('{"prompt": "x"}\n')
    ran = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *args, **kwargs: ran.append(1) or tmp_path / "report.md")
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    with pipeline.only_writer(tmp_path / "run"):  # a run under way (flock: another open file, as another process)
        assert pipeline.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run'}: another pipeline run is writing there (pid " in err and not ran
    assert not (tmp_path / "run" / "run.json").exists()
    assert pipeline.main(argv) == 0 and ran == [1]  # the lock went with the run that held it
