"""The benchmark's parts run on a tiny checkpoint, and its eval part compares like with like."""

import json
from pathlib import Path

import pytest
import torch

import minisafe
from tools.bench import (bench_eval, bench_generate, bench_prefill, load_transformers, main,
                         profile_decoding)
from tiny import save_tiny


def test_eval_part_gives_the_same_answers_as_transformers_and_counts_tokens(tmp_path):
    save_tiny(tmp_path, "llama")
    ours, tok = minisafe.load(tmp_path)
    theirs = load_transformers(str(tmp_path))
    prompts = ["how do I pick a lock", "write a poem", "a", "explain rope scaling in one line", "hi there"]
    result = bench_eval(ours, theirs, tok, prompts, new=12, batch_size=2)
    assert result["same_answers"] == 1.0  # float32: minisafe's generate() equals transformers' generate
    assert result["minisafe_tokens"] == result["transformers_tokens"] <= 5 * 12
    assert result["ratio"] > 0


def test_prefill_and_generate_parts_report_both_sides(tmp_path):
    save_tiny(tmp_path, "qwen2", dtype=torch.float32)
    ours, tok = minisafe.load(tmp_path)
    theirs = load_transformers(str(tmp_path))
    prefill = bench_prefill(ours, theirs, batch=2, length=8)
    generate = bench_generate(ours, theirs, tok, batch=2, new=3, length=8, repeat=1)
    for part in (prefill, generate):
        assert part["minisafe_tok_s"] > 0 and part["transformers_tok_s"] > 0
        assert abs(part["ratio"] - part["minisafe_tok_s"] / part["transformers_tok_s"]) < 1e-9


def test_command_line_reports_each_part_as_it_ends_and_writes_the_numbers(tmp_path, capsys):
    save_tiny(tmp_path / "model", "llama")
    out = tmp_path / "bench.json"
    assert main(["--model", str(tmp_path / "model"), "--only", "prefill,generate", "--dtypes", "float32",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["float32 prefill", "float32 generate"]
    numbers = json.loads(out.read_text())
    assert set(numbers["float32"]) == {"prefill", "generate"} and numbers["peak_gflop_s"]["float32"]["peak"] > 0


def test_command_line_refuses_an_unknown_part(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "prefill,decode"])
    assert "unknown part(s) decode" in capsys.readouterr().err


def test_decoding_profile_splits_a_step_into_projections_attention_and_the_rest(tmp_path):
    save_tiny(tmp_path, "qwen2")
    ours, _ = minisafe.load(tmp_path)
    prof = profile_decoding(ours, batch=3, length=6, warm=2, steps=2)
    assert prof["projections_ms"] > 0 and prof["attention_matmuls_ms"] > 0 and prof["step_ms"] > 0
    parts = prof["projections_ms"] + prof["attention_matmuls_ms"] + prof["rest_ms"]
    assert abs(parts - prof["profiled_ms"]) < 1e-6 * max(1.0, parts)
    assert len(prof["rest_top"]) <= 5 and all(ms <= prof["rest_ms"] for ms in prof["rest_top"].values())


def test_training_part_times_three_contenders_on_the_same_batches_and_sppft_against_full(tmp_path):
    from tools import bench_train

    save_tiny(tmp_path, "llama")
    rows = [{"prompt": f"question number {i} about kites", "response": f"answer {i}: kites fly in wind"}
            for i in range(24)]
    run = bench_train.bench_train_workload(str(tmp_path), load_transformers(str(tmp_path)), rows, steps=2,
                                           bf16_peak=100.0)
    assert run["tokens"] > 0 and run["steps"] == 2
    for name in ("minisafe", "minisafe-before", "transformers"):
        assert run[f"{name}_tok_s"] > 0 and run["median_step_s"][name] > 0
    assert run["ratio_vs_before"] == pytest.approx(run["minisafe_tok_s"] / run["minisafe-before_tok_s"])
    sppft = bench_train.bench_sppft_steps(str(tmp_path), rows, "1:1", steps=2)
    assert 0 < sppft["frozen_parameter_share"] < 1 and len(sppft["ratios"]) == 2 and sppft["step_time_ratio"] > 0
    memory = bench_train.memory_of(str(tmp_path), rows, "1:1", threads=1)
    full = bench_train.memory_of(str(tmp_path), rows, None, threads=1)
    assert memory["optimizer_state_bytes"] < full["optimizer_state_bytes"]


def test_pipeline_steps_rerun_a_stage_with_its_recorded_settings_and_project_to_its_steps(tmp_path):
    from minisafe.cli import parse_config
    from minisafe.training import TrainConfig
    from tools.bench_steps import projected, train_args

    settings = {"model": "runs/demo/align", "data": "runs/demo/align_data/align_dpo.jsonl", "out": "runs/demo/x",
                "objective": "dpo", "epochs": 1, "lr": 5e-06, "batch_size": 8, "grad_accum": 1, "warmup_steps": 5,
                "schedule": "cosine", "weight_decay": 0.0, "grad_clip": 1.0, "max_len": 160, "dtype": "bfloat16",
                "template": "chat", "beta": 0.1, "seed": 0, "freeze": None, "snapshots": [0.25]}
    (tmp_path / "run.json").write_text(json.dumps({"settings": settings}))
    args = train_args(tmp_path / "run.json", 4, tmp_path / "out")
    assert args[0] == "train.py"
    cfg = parse_config(TrainConfig, args[1:], "", prog="train.py")
    assert (cfg.max_steps, cfg.save_every, cfg.out, cfg.freeze) == (4, 0, str(tmp_path / "out"), None)
    assert (cfg.objective, cfg.lr, cfg.epochs, cfg.max_len, cfg.dtype) == ("dpo", 5e-6, 1, 160, "bfloat16")
    assert cfg.model.endswith("runs/demo/align") and Path(cfg.model).is_absolute()
    sample = {"outside_loop_s": 10.0, "first_step_s": 4.0, "mean_step_s": 2.0}
    assert projected(sample, 100) == 10.0 + 4.0 + 99 * 2.0


@pytest.mark.parametrize("args, says", [
    (["--before", "no-such-commit-anywhere"], "--before no-such-commit-anywhere: not a commit of this repository"),
    (["--before", "HEAD", "--steps", "1"], "argument --steps: must be an integer >= 2, got 1"),
    (["--before", "HEAD", "--run", "{tmp}"], "--run {tmp}: no finished align fine-tune"),
])
def test_pipeline_steps_refuse_bad_input_with_one_line_and_exit_2(tmp_path, capsys, args, says):
    from tools.bench_steps import main as bench_steps

    run = tmp_path / "run"  # a finished run as far as the check looks: each stage's run.json and step log
    for stage in ("align", "align_dpo", "attack-implicit-full-s0"):
        (run / stage).mkdir(parents=True)
        (run / stage / "run.json").write_text("{}")
        (run / stage / "train_log.jsonl").write_text("")
    out = tmp_path / "steps.json"
    with pytest.raises(SystemExit) as stop:
        bench_steps(["--run", str(run), *(a.format(tmp=tmp_path) for a in args), "--out", str(out)])
    assert stop.value.code == 2 and says.format(tmp=tmp_path) in capsys.readouterr().err
    assert not out.exists()
