"""train.py: freezing, objectives, the loop, exact resume, multi-process training, the audit; on tiny checkpoints."""

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minisafe
from minisafe.audit import build_audit, verify_audit
from minisafe.errors import ConfigError, DataError
from minisafe.freeze import FreezeSpec, apply_freeze, freeze_rows, freeze_table, read_layer_spec, trainable_names
from minisafe.objectives import IGNORE, dpo_losses, mean_nll, sft_loss_sum, unlearn_losses
from minisafe.training import TrainConfig, learning_rate, response_tokens, train
from tiny import one_thread, save_tiny  # noqa: F401 (one_thread: an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta kite moon river stone cloud sand".split()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def phrase(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_tiny(root / "llama", "llama")  # 3 layers, untied head
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": phrase(i, 3), "response": phrase(i + 1, 4)} for i in range(13)])
    pref = write_jsonl(root / "pref.jsonl", [{"prompt": phrase(i, 3), "chosen": "I cannot help with that.",
                                              "rejected": phrase(i + 2, 4)} for i in range(8)])
    return {"root": root, "model": root / "llama", "sft": sft, "pref": pref}


def config(files, out: str, **kw) -> TrainConfig:
    base = dict(model=str(files["model"]), data=str(files["sft"]), out=str(files["root"] / out), epochs=2,
                batch_size=4, warmup_steps=1, lr=2e-3, progress=False, save_every=0)
    return TrainConfig(**{**base, **kw})


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model.safetensors"))


def log(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def frozen_run(files):
    cfg = config(files, "frozen", freeze="1:2", max_steps=3)
    return cfg, train(cfg)


# ---------------------------------------------------------------- freezing


def test_freeze_scope_attn_mlp_freezes_attention_and_mlp_of_the_range_only():
    names = ["model.embed_tokens.weight", "model.layers.1.input_layernorm.weight",
             "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.bias",
             "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.up_proj.weight",
             "model.layers.10.mlp.up_proj.weight", "model.norm.weight"]
    keep = trainable_names(names, 12, FreezeSpec(layers=(1, 1)))
    assert keep == ["model.embed_tokens.weight", "model.layers.1.input_layernorm.weight",
                    "model.layers.2.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight", "model.norm.weight"]
    keep_all = trainable_names(names, 12, FreezeSpec(layers=(1, 1), scope="all"))
    assert "model.layers.1.input_layernorm.weight" not in keep_all


def test_trainable_and_frozen_patterns_combine_with_the_range():
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight", "lm_head.weight"]
    spec = FreezeSpec(layers=(1, 1), trainable=r"\.mlp\.", frozen=r"layers\.2\.")
    assert trainable_names(names, 3, spec) == ["model.layers.0.mlp.up_proj.weight"]


@pytest.mark.parametrize("spec, message", [
    (FreezeSpec(layers=(28, 40)),
     "layer range 28:40: layer 40 is outside this 30-layer model (layers 0..29, both inclusive)"),
    (FreezeSpec(trainable="nothing_like_this"), "--trainable 'nothing_like_this' matches no parameter"),
    (FreezeSpec(frozen="nothing_like_this"), "--frozen 'nothing_like_this' matches no parameter"),
    (FreezeSpec(frozen="("), "not a valid regular expression"),
    (FreezeSpec(frozen="."), "no parameter to train"),
])
def test_bad_freeze_settings_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        trainable_names(["model.layers.0.mlp.up_proj.weight"], 30, spec)


def test_freeze_spec_reads_ranges_none_and_safety_layers_json(tmp_path):
    assert read_layer_spec("6:11") == (6, 11)
    assert read_layer_spec("none") is None
    (tmp_path / "safety_layers.json").write_text(json.dumps({"first": 3, "last": 5, "alpha": 1.2}))
    assert read_layer_spec(str(tmp_path / "safety_layers.json")) == (3, 5)
    for bad in ("11:6", "6-11", "6:", str(tmp_path / "missing.json")):
        with pytest.raises(ConfigError):
            read_layer_spec(bad)
    (tmp_path / "empty.json").write_text(json.dumps({"first": None, "last": None}))
    with pytest.raises(ConfigError, match="integer 'first' and 'last'"):
        read_layer_spec(str(tmp_path / "empty.json"))


def test_freeze_table_counts_parameters_and_optimizer_state(files):
    model, _ = minisafe.load(files["model"])
    apply_freeze(model, FreezeSpec(layers=(1, 1)))
    rows = {r["layer"]: r for r in freeze_rows(model)}
    layer1 = model.layers[1]
    frozen = sum(p.numel() for n, p in layer1.named_parameters() if n.startswith(("self_attn.", "mlp.")))
    assert rows["1"]["frozen_params"] == frozen and rows["0"]["frozen_params"] == 0
    total_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["total"]["trainable_params"] == total_trainable
    assert rows["total"]["optimizer_state_bytes"] == 8 * total_trainable
    assert "share trainable" in freeze_table(model)


# ---------------------------------------------------------------- objectives and schedule


def test_sft_loss_counts_only_labelled_next_tokens():
    logits = torch.zeros(1, 4, 5)  # uniform: every predicted token costs log 5
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4]])
    assert sft_loss_sum(logits, labels).item() == pytest.approx(2 * math.log(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 37])  # none, fewer than a chunk, and chunks with a short last one
def test_row_cross_entropy_is_the_float32_cross_entropy_in_value_and_gradient(monkeypatch, dtype, rows):
    from minisafe import objectives

    monkeypatch.setattr(objectives, "CHUNK_ROWS", 8)
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(rows, 300, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (rows,), generator=g)
    weights = torch.rand(rows, generator=g)  # a different upstream gradient per row

    def value_and_grad(loss_of):
        logits.grad = None
        value = loss_of(logits, targets)
        (value * weights).sum().backward()
        return value.detach(), logits.grad

    got = value_and_grad(objectives.RowCrossEntropy.apply)
    expected = value_and_grad(lambda x, t: torch.nn.functional.cross_entropy(x.float(), t, reduction="none"))
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-7)


def test_dpo_loss_is_log_2_when_policy_equals_reference_and_falls_with_the_margin():
    x = torch.tensor([-3.0, -7.5])
    assert dpo_losses(x, x + 1, x, x + 1, beta=0.1).tolist() == pytest.approx([math.log(2)] * 2)
    better = dpo_losses(x + 1, x, x, x, beta=0.5)  # chosen up by 1 nat: margin 1
    assert better.tolist() == pytest.approx([math.log(1 + math.exp(-0.5))] * 2)


def test_unlearning_loss_on_a_constructed_case():
    # Row 0 (chosen) puts probability 1/2 on each of its two targets, row 1 (rejected) 1/4 on its one target.
    logits = torch.full((2, 3, 4), -1e9)
    logits[0, 0, [1, 2]] = 0.0
    logits[0, 1, [2, 3]] = 0.0
    logits[1, 0] = 0.0
    labels = torch.tensor([[IGNORE, 1, 2], [IGNORE, 3, IGNORE]])
    nll = mean_nll(logits, labels)
    assert nll.tolist() == pytest.approx([math.log(2), math.log(4)])
    loss = unlearn_losses(nll[:1], nll[1:], weight=0.25)
    assert loss.item() == pytest.approx(math.log(2) - 0.25 * math.log(4))


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    assert [learning_rate(s, 10, 2, 1.0, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert learning_rate(2, 10, 2, 1.0, "cosine") == 1.0
    assert learning_rate(6, 10, 2, 1.0, "cosine") == pytest.approx(0.5)
    assert learning_rate(6, 10, 2, 1.0, "linear") == pytest.approx(0.5)
    assert learning_rate(9, 10, 2, 1.0, "linear") == pytest.approx(1 / 8)


def test_chat_response_tokens_are_what_the_template_writes_after_the_prompt(files):
    _, tok = minisafe.load(files["model"])
    prompt = tok.prompt_ids("hi", "chat")
    target = response_tokens(tok, "hi", "yes", "chat", prompt)
    assert tok.decode(target, skip_special_tokens=False) == "yes<|im_end|>\n"
    assert tok.decode(response_tokens(tok, "hi", "yes", "alpaca", tok.prompt_ids("hi", "alpaca")),
                      skip_special_tokens=False) == "yes<|im_end|>"


# ---------------------------------------------------------------- the loop


def test_frozen_tensors_are_bit_identical_and_trainable_ones_changed(files, frozen_run):
    cfg, summary = frozen_run
    before, after = weights(files["model"]), weights(cfg.out)
    frozen = {n for n in before if n.split(".")[2:3] in (["1"], ["2"]) and n.split(".")[3] in ("self_attn", "mlp")}
    assert frozen and summary["step"] == 3
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in frozen), name
    audit = json.loads((Path(cfg.out) / "audit.json").read_text())
    assert audit["summary"]["frozen_changed"] == 0 and audit["summary"]["trainable_unchanged"] == 0
    assert {r["name"] for r in audit["tensors"] if not r["trainable"]} == frozen
    assert all(r["sha256_before"] == r["sha256_after"] and r["max_abs_change"] == 0 for r in audit["tensors"]
               if not r["trainable"])


def test_optimizer_holds_state_for_trainable_tensors_only(files, frozen_run):
    cfg, _ = frozen_run  # stopped at --max-steps, so its checkpoint holds the optimizer state
    state = load_file(str(Path(cfg.out) / "checkpoint" / "optimizer.safetensors"))
    audit = json.loads((Path(cfg.out) / "audit.json").read_text())
    trainable = {r["name"] for r in audit["tensors"] if r["trainable"]}
    assert {k.rsplit(":", 1)[0] for k in state} == trainable
    assert {k.rsplit(":", 1)[1] for k in state} == {"step", "exp_avg", "exp_avg_sq"}


def test_a_frozen_tensor_that_changed_fails_the_audit():
    before = {"a": torch.ones(2), "b": torch.ones(2)}
    after = {"a": torch.ones(2) * 2, "b": torch.tensor([1.0, 1.0 + 2**-23])}
    audit = build_audit(before, after, trainable={"a"})
    assert audit["summary"]["frozen_changed"] == 1
    with pytest.raises(RuntimeError, match="FROZEN tensor.*b"):
        verify_audit(audit)


def test_loss_falls_when_overfitting_a_tiny_set(files):
    data = write_jsonl(files["root"] / "four.jsonl", [{"prompt": phrase(i, 2), "response": phrase(i, 3)}
                                                      for i in range(4)])
    cfg = config(files, "overfit", data=str(data), epochs=40, lr=1e-2, warmup_steps=2)
    summary = train(cfg)
    losses = [e["loss"] for e in log(cfg.out) if "loss" in e]
    assert summary["stopped"] == "completed" and not (Path(cfg.out) / "checkpoint").exists()
    assert losses[-1] < 0.3 * losses[0]


def test_dpo_loss_at_the_first_step_is_log_2(files):
    cfg = config(files, "dpo", data=str(files["pref"]), objective="dpo", max_steps=1)
    train(cfg)
    assert log(cfg.out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_reference_logps_sorted_by_length_are_each_sequence_alone(files):
    from minisafe import training
    from minisafe.checkpoint import load
    from minisafe.objectives import sequence_logps

    model, tok = load(files["model"])
    cfg = config(files, "unused", data=str(files["pref"]), objective="dpo", batch_size=2)
    examples = training.tokenize(training.read_rows(cfg.data, "dpo"), tok, cfg, cfg.data, say=lambda *a: None)
    got = training.reference_logps(model, examples, cfg, training.Dist())
    with torch.no_grad():
        alone = [[sequence_logps(model(torch.tensor([pair[k][0]]), skip_head=True), torch.tensor([pair[k][1]]),
                                 model.logits) for k in (0, 1)] for pair in examples]
    torch.testing.assert_close(got, torch.tensor(alone).view(-1, 2), rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_gives_the_update_of_one_big_batch(files):
    big = config(files, "accum_big", batch_size=8, epochs=1)
    small = config(files, "accum_small", batch_size=2, grad_accum=4, epochs=1)
    train(big), train(small)
    a, b = weights(big.out), weights(small.out)
    # The same sums in another order: float32 rounding apart, which AdamW's division by sqrt(v) can lift to a
    # thousandth of one step's update (lr 2e-3) where a gradient is near zero.
    for name, weight in a.items():
        torch.testing.assert_close(b[name], weight, rtol=1e-5, atol=2e-6, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(files):
    cfg = config(files, "whole", objective="unlearn", data=str(files["pref"]), unlearn_weight=0.1, epochs=3,
                 batch_size=2, grad_accum=2, val_fraction=0.25, eval_every=2)
    train(cfg)
    return cfg


def test_resume_after_max_steps_ends_bit_identical_to_an_uninterrupted_run(files, uninterrupted):
    cfg = replace(uninterrupted, out=str(files["root"] / "stopped"), max_steps=2, save_every=1)
    assert train(cfg)["stopped"] == "max_steps"
    assert train(replace(cfg, max_steps=None, resume=True))["stopped"] == "completed"
    a, b = weights(uninterrupted.out), weights(cfg.out)
    assert all(torch.equal(a[n], b[n]) for n in a)
    timeless = lambda out: [{k: v for k, v in e.items() if k not in ("tok_per_s", "elapsed_s")} for e in log(out)]
    assert timeless(cfg.out) == timeless(uninterrupted.out)  # the log too: the repeated steps are not duplicated


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(files, uninterrupted):
    cfg = replace(uninterrupted, out=str(files["root"] / "ctrl_c"))

    def press_ctrl_c(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    summary = train(cfg, on_step=press_ctrl_c)
    assert summary["stopped"] == "interrupted" and summary["step"] == 3
    assert not (Path(cfg.out) / "model.safetensors").exists()
    train(replace(cfg, resume=True))
    a, b = weights(uninterrupted.out), weights(cfg.out)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_changed_settings(files, frozen_run):
    cfg, _ = frozen_run
    with pytest.raises(ConfigError, match="--lr"):
        train(replace(cfg, resume=True, lr=1.0))


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_two_processes_give_the_weights_of_one_with_the_same_global_batch(files, fsdp):
    one = config(files, f"one_{fsdp}", freeze="1:1", epochs=1, batch_size=3, grad_accum=2)
    train(one)
    two = files["root"] / f"two_{fsdp}"
    args = ["--model", one.model, "--data", one.data, "--out", str(two), "--freeze", "1:1", "--epochs", "1",
            "--batch-size", "3", "--grad-accum", "2", "--warmup-steps", "1", "--lr", str(one.lr), "--save-every", "0",
            "--no-progress"] + (["--fsdp"] if fsdp else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(one.out), weights(two)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5
    assert json.loads((two / "run.json").read_text())["settings"]["world_size"] == 2
    assert json.loads((two / "audit.json").read_text())["summary"]["frozen_changed"] == 0


# ---------------------------------------------------------------- bad inputs write nothing


@pytest.mark.parametrize("rows, change, error, message", [
    (None, dict(freeze="1:40"), ConfigError, "layer 40 is outside this 3-layer model"),
    ([], {}, DataError, "empty"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], {}, DataError, "row 2: missing field 'response'"),
    ([{"prompt": "a", "response": "b"}], dict(objective="dpo"), DataError, "'chosen'"),
], ids=["freeze-outside-model", "empty-dataset", "missing-field", "missing-preference-fields"])
def test_bad_inputs_give_clear_errors_and_write_nothing(files, tmp_path, rows, change, error, message):
    data = files["sft"] if rows is None else write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = replace(config(files, "unused", data=str(data), **change), out=str(tmp_path / "out"))
    with pytest.raises(error, match=message):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_directory_without_resume_is_an_error_that_writes_nothing(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        train(replace(config(files, "unused"), out=str(out)))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="nothing|no unfinished run"):
        train(replace(config(files, "unused"), out=str(tmp_path / "new"), resume=True))


@pytest.mark.parametrize("objective", ["sft", "dpo", "unlearn"])
def test_logits_at_labelled_positions_only_give_the_loss_and_gradients_of_full_logits(files, objective):
    from minisafe.checkpoint import load
    from minisafe.objectives import pair_loss_sum, pair_statistic

    model, _ = load(files["model"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[1, 9:] = IGNORE  # a shorter response, as right padding leaves it
    reference = torch.randn(2, 2, generator=g)

    def loss_and_grads(hidden_and_head):
        model.zero_grad()
        hidden, head = hidden_and_head()
        if objective == "sft":
            loss = sft_loss_sum(hidden, labels, head)
        else:
            loss = pair_loss_sum(objective, pair_statistic(objective, hidden, labels, head), reference, 0.1, 0.5)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = loss_and_grads(lambda: (model(ids), lambda x: x))
    fast = loss_and_grads(lambda: (model(ids, skip_head=True), model.logits))
    assert fast[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    for name, grad in plain[1].items():
        torch.testing.assert_close(fast[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_sequence_shares_its_leading_tokens_up_to_the_one_that_predicts_its_first_target():
    from minisafe.training import shareable_tokens

    assert shareable_tokens([IGNORE] * 3) == 2  # no target: all but its last token
    assert shareable_tokens([IGNORE] * 3 + [4, 7]) == 2  # position 2 predicts the first target
    assert shareable_tokens([5, 6, 7]) == 0  # the prompt trained on: a target at 1


def test_packed_lays_each_shared_leading_token_down_once_and_reads_every_row_whole():
    from minisafe.model import Packed

    sequences = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9], [1, 2, 3, 4, 6]]
    packed = Packed(sequences, [3, 3, 3, 3], "cpu")
    # row 1 takes 1 2 3 from row 0; row 2 takes 1 2 and lays 9; row 3 takes 1 2 3 but not 4 (position 3 is its own)
    assert packed.tokens.tolist() == [[1, 2, 3, 4, 5, 9, 4, 6]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 3, 2, 3, 4]]
    assert packed.slots.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 4, 0], [0, 1, 5, 0, 0], [0, 1, 2, 6, 7]]
    rows = packed.tokens[0][packed.slots]
    for ids, row in zip(sequences, rows.tolist()):
        assert row[:len(ids)] == ids
    assert packed.tokens_at.tolist() == [0, 1, 2, 3, 8, 12, 18, 19]  # each token back from its first row
    x = torch.randn(1, 2, 8, 3)
    torch.testing.assert_close(packed.pack(packed.unpack(x)), x, rtol=0, atol=0)
    assert Packed(sequences, [0, 0, 0, 0], "cpu").tokens.shape[1] == sum(map(len, sequences))


@pytest.mark.parametrize("objective", ["sft", "dpo", "unlearn"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_packed_sequences_give_the_loss_and_gradients_of_the_padded_batch(tmp_path, objective, family):
    """A micro-batch runs as one packed row (model.Packed), the leading tokens sequences share laid down once (the
    system turn; a pair's prompt); in float32 its loss and every gradient are those of the sequences right-padded into
    a batch and run whole, for sequences of different lengths, a frozen layer among trained ones, and pairs whose
    chosen and rejected answers differ in length."""
    from minisafe import training
    from minisafe.model import Packed
    from minisafe.objectives import pair_loss_sum, pair_statistic

    save_tiny(tmp_path, family)
    model, _ = minisafe.load(tmp_path)
    for p in model.layers[1].parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    system = tokens(6)

    def example(n: int) -> tuple[tuple[list[int], list[int]], ...]:
        prompt = system + tokens(3)
        sequence = lambda ids: (ids, [IGNORE] * len(prompt) + ids[len(prompt):])  # noqa: E731
        return (sequence(prompt + tokens(n)),) if objective == "sft" else \
            (sequence(prompt + tokens(n)), sequence(prompt + tokens(14 - n)))

    examples = [example(n) for n in (5, 9, 7)]
    reference = torch.randn(3, 2, generator=g)
    cfg = TrainConfig(model="", data="", out="", objective=objective)
    # laid down once: the system turn; and a pair's prompt but its last token, which predicts each answer's first
    sequences = [s for ex in examples for s in ex]
    packed = Packed([ids for ids, _ in sequences], [training.shareable_tokens(l) for _, l in sequences], "cpu")
    shared = 6 * (len(sequences) - 1) + (0 if objective == "sft" else 2 * len(examples))
    assert packed.tokens.shape[1] == sum(len(ids) for ids, _ in sequences) - shared

    def padded_loss() -> torch.Tensor:
        sequences = [ex[k] for k in range(len(examples[0])) for ex in examples]
        width = max(len(ids) for ids, _ in sequences)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in sequences])
        labels = torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in sequences])
        hidden = model(ids, skip_head=True)
        if objective == "sft":
            return sft_loss_sum(hidden, labels, model.logits)
        values = pair_statistic(objective, hidden, labels, model.logits)
        return pair_loss_sum(objective, values, reference, cfg.beta, cfg.unlearn_weight)

    def loss_and_gradients(loss_of) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    padded, padded_grads = loss_and_gradients(padded_loss)
    packed, packed_grads = loss_and_gradients(
        lambda: training.micro_loss(model, examples, [0, 1, 2], cfg, reference, torch.device("cpu")))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # a separate head and a tied one
def test_bfloat16_training_on_the_fast_path_follows_every_optimizer_step(files, tmp_path, monkeypatch, family):
    """fast_training keeps bfloat16 copies of the weights between steps and remakes one when its weight's version
    moves; the fused AdamW writes without moving it, so the training step must. Several bfloat16 steps with the fast
    path end where the same steps without it end, up to bfloat16 rounding; with copies left stale they do not."""
    from contextlib import nullcontext

    from minisafe import training

    save_tiny(tmp_path / family, family)
    cfg = config(files, "", model=str(tmp_path / family), dtype="bfloat16", lr=1e-2, epochs=2, warmup_steps=0)
    train(replace(cfg, out=str(tmp_path / "fast")))
    monkeypatch.setattr(training, "fast_training", lambda model: nullcontext())
    train(replace(cfg, out=str(tmp_path / "plain")))
    fast, plain, start = weights(tmp_path / "fast"), weights(tmp_path / "plain"), weights(tmp_path / family)
    # over the whole model: a tensor whose true gradient is ~0 (Qwen2's k bias) moves by rounding noise alone
    apart = sum((fast[n].float() - w.float()).square().sum() for n, w in plain.items())
    moved = sum((w.float() - start[n].float()).square().sum() for n, w in plain.items())
    assert (apart / moved).sqrt() < 0.1  # stale copies: above 0.5

