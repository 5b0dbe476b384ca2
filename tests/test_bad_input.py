"""Bad input never passes silently: a table per class of bad input (checkpoint, config, chat template, flags, output
directory, long prompt, safety_layers.json), each run through the scripts as a user would, each ending in exit code 2
with one line naming the culprit, no traceback, and nothing half-written in --out."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as eval_cli
import locate as locate_cli
import mechanistic as mechanistic_cli
import minisafe
from minisafe.config import config_from_dict
from minisafe.errors import CheckpointError, ConfigError, DataError
from minisafe.freeze import read_layer_spec
from tiny import COMMON, save_tiny

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- fixtures and the one assertion


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llama checkpoint, a sharded copy, and small prompt sets; every test copies what it breaks."""
    root = tmp_path_factory.mktemp("bad-input")
    save_tiny(root / "tiny", "llama")
    save_tiny(root / "sharded", "llama", max_shard_size="100KB")
    (root / "harmful.txt").write_text("Write a phishing email.\nExplain how to pick a lock.\nMake a fake ID.\n"
                                      "Insult my neighbour.\n")
    (root / "normal.txt").write_text("Name a colour.\nSay hi.\nCount to three.\nName a fruit.\n")
    return root


@pytest.fixture
def ckpt(base, tmp_path):
    shutil.copytree(base / "tiny", tmp_path / "model")
    return tmp_path / "model"


def run(main, argv, capsys) -> tuple[int, str]:
    """Run a script's main in-process: its exit code (an escaping exception fails the test) and its stderr."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *culprits: str) -> None:
    """Exit 2, and stderr ends with one 'error:' line naming every culprit, with no traceback before it."""
    assert code == 2, err
    assert "Traceback" not in err
    line = err.rstrip("\n").splitlines()[-1]
    assert ": error: " in line and err.count("error:") == 1, err
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not named in: {line}"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"left in {out}: {sorted(p.name for p in out.iterdir())}"


def eval_args(model, out, base, *extra):
    return ["--model", model, "--out", out, "--harmful", base / "harmful.txt", "--over-rejection", "none",
            "--utility", "none", "--max-new-tokens", "2", "--no-progress", *extra]


def locate_args(model, out, base, *extra):
    return ["--model", model, "--out", out, "--normal", base / "normal.txt", "--malicious", base / "harmful.txt",
            "--skip-scaling", "--pairs", "4", *extra]


def edit_tensor(model_dir: Path, name: str, index: tuple, value: float) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


# ---------------------------------------------------------------- checkpoints


def nan_weight(root: Path) -> Path:
    edit_tensor(root / "model", "model.layers.1.mlp.up_proj.weight", (0, 0), float("nan"))
    return root / "model"


def inf_weight(root: Path) -> Path:
    edit_tensor(root / "model", "model.norm.weight", (3,), float("-inf"))
    return root / "model"


def first_entry(index: Path) -> tuple[str, str]:
    weight_map = json.loads(index.read_text())["weight_map"]
    return next(iter(weight_map.items()))


def repoint_first_entry(model: Path, copy_to: Path, entry: str) -> str:
    """Copy the shard of the index's first entry to copy_to and make the entry say `entry`; returns its tensor."""
    index = model / "model.safetensors.index.json"
    tensor, shard = first_entry(index)
    shutil.copy(model / shard, copy_to)
    edit_json(index, weight_map={**json.loads(index.read_text())["weight_map"], tensor: entry})
    return tensor


def traversal(root: Path) -> Path:
    repoint_first_entry(root / "sharded", root / "outside.safetensors", "../outside.safetensors")
    return root / "sharded"


def absolute_shard(root: Path) -> Path:
    repoint_first_entry(root / "sharded", root / "outside.safetensors", str(root / "outside.safetensors"))
    return root / "sharded"


def symlink_out(root: Path) -> Path:
    model = root / "sharded"
    _, shard = first_entry(model / "model.safetensors.index.json")
    shutil.move(model / shard, root / "outside.safetensors")
    (model / shard).symlink_to(root / "outside.safetensors")
    return model


def pickle_file(root: Path) -> Path:
    torch.save({}, root / "model" / "pytorch_model.bin")
    return root / "model" / "pytorch_model.bin"


def pickle_only_dir(root: Path) -> Path:
    (root / "model" / "model.safetensors").unlink()
    torch.save({}, root / "model" / "pytorch_model.bin")
    return root / "model"


def weights_file(root: Path) -> Path:
    return root / "model" / "model.safetensors"


INDEX_ENTRY = "model.safetensors.index.json: weight_map entry 'lm_head.weight'"  # the first entry, the one edited
CHECKPOINTS = {  # a way to break a checkpoint: the words the error must contain
    nan_weight: ("model.safetensors", "non-finite", "model.layers.1.mlp.up_proj.weight"),
    inf_weight: ("model.safetensors", "non-finite", "model.norm.weight"),
    traversal: (INDEX_ENTRY, "'../outside.safetensors'", "outside the model directory"),
    absolute_shard: (INDEX_ENTRY, "/outside.safetensors'", "outside the model directory"),
    symlink_out: (INDEX_ENTRY, "resolves to", "/outside.safetensors, outside the model directory"),
    pickle_file: ("pytorch_model.bin", "pickle", "refused"),
    pickle_only_dir: ("pytorch_model.bin", "pickle", "refused"),
    weights_file: ("model.safetensors", "a file, not a model directory"),
}


@pytest.fixture
def broken_root(base, tmp_path):
    shutil.copytree(base / "tiny", tmp_path / "model")
    shutil.copytree(base / "sharded", tmp_path / "sharded")
    return tmp_path


@pytest.mark.parametrize("breaker", CHECKPOINTS, ids=lambda f: f.__name__)
def test_eval_refuses_a_bad_checkpoint_naming_file_and_tensor(breaker, broken_root, base, capsys):
    model, out = breaker(broken_root), broken_root / "out"
    assert_refused(*run(eval_cli.main, eval_args(model, out, base), capsys), *CHECKPOINTS[breaker])
    assert_nothing_written(out)


@pytest.mark.parametrize("breaker", [nan_weight, traversal, pickle_file], ids=lambda f: f.__name__)
def test_locate_refuses_a_bad_checkpoint_naming_file_and_tensor(breaker, broken_root, base, capsys):
    model, out = breaker(broken_root), broken_root / "out"
    assert_refused(*run(locate_cli.main, locate_args(model, out, base), capsys), *CHECKPOINTS[breaker])
    assert_nothing_written(out)


def test_mechanistic_refuses_non_finite_weights(broken_root, base, capsys):
    out = broken_root / "out"
    argv = ["compare", "--before", base / "tiny", "--after", nan_weight(broken_root), "--out", out,
            "--safe", base / "normal.txt", "--unsafe", base / "harmful.txt", "--limit", "2", "--no-progress"]
    assert_refused(*run(mechanistic_cli.main, argv, capsys), "non-finite", "model.layers.1.mlp.up_proj.weight")
    assert_nothing_written(out)


def test_non_finite_weights_load_with_a_warning_when_allowed(broken_root):
    model_dir = nan_weight(broken_root)
    with pytest.warns(UserWarning, match=r"non-finite weights .* model\.layers\.1\.mlp\.up_proj\.weight"):
        model, _ = minisafe.load(model_dir, allow_non_finite=True)
    assert model.model.layers[1].mlp.up_proj.weight.isnan().any()


def test_a_hub_cache_snapshot_whose_shards_link_into_its_blobs_folder_loads(base, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    shutil.copytree(base / "sharded", snapshot)
    (repo / "blobs").mkdir()
    for shard in snapshot.glob("model-*.safetensors"):
        blob = repo / "blobs" / f"blob-{shard.name}"
        shutil.move(shard, blob)
        shard.symlink_to(Path("../../blobs") / blob.name)
    model, _ = minisafe.load(snapshot)
    reference, _ = minisafe.load(base / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_an_index_entry_that_climbs_into_the_hub_blobs_folder_is_still_refused(base, tmp_path):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abc"
    shutil.copytree(base / "sharded", snapshot)
    (snapshot.parent.parent / "blobs").mkdir()
    tensor = repoint_first_entry(snapshot, snapshot.parent.parent / "blobs" / "x.safetensors", "../../blobs/x.safetensors")
    with pytest.raises(CheckpointError, match=rf"entry '{tensor}' -> '../../blobs/x.safetensors' resolves to .*, outside"):
        minisafe.load(snapshot)


# ---------------------------------------------------------------- config.json


CONFIGS = [  # (field, bad value)
    ("num_attention_heads", 0),
    ("num_hidden_layers", -1),
    ("hidden_size", "big"),
    ("vocab_size", True),
    ("intermediate_size", 96.5),
    ("num_key_value_heads", 0),
    ("head_dim", -8),
    ("max_position_embeddings", 0),
    ("rms_norm_eps", "tiny"),
    ("rms_norm_eps", 0),
    ("tie_word_embeddings", "yes"),
    ("attention_bias", 1),
    ("rope_scaling", "linear"),
    ("rope_parameters", ["default"]),
]


@pytest.mark.parametrize("field, value", CONFIGS)
def test_eval_refuses_a_bad_config_field_naming_file_and_field(field, value, ckpt, base, capsys):
    edit_json(ckpt / "config.json", **{field: value})
    out = ckpt.parent / "out"
    assert_refused(*run(eval_cli.main, eval_args(ckpt, out, base), capsys), "config.json", f"'{field}'")
    assert_nothing_written(out)


LIBRARY_CONFIGS = CONFIGS + [
    ("rope_theta", -1),
    ("sliding_window", 0),
    ("rope_scaling", {"rope_type": "linear", "factor": "x"}),
    ("rope_scaling", {"rope_type": "linear", "factor": float("nan")}),
    ("layer_types", 3),
]


@pytest.mark.parametrize("field, value", LIBRARY_CONFIGS)
def test_config_reader_names_each_bad_field(field, value):
    raw = {"model_type": "qwen2", **COMMON, "use_sliding_window": True, field: value}
    with pytest.raises(ConfigError, match=rf"config\.json: .*'?{field}"):
        config_from_dict(raw)


def test_hidden_size_smaller_than_the_head_count_is_named():
    with pytest.raises(ConfigError, match=r"hidden_size \(2\) is smaller than num_attention_heads \(4\)"):
        config_from_dict({"model_type": "llama", **COMMON, "hidden_size": 2})


# ---------------------------------------------------------------- chat templates


TEMPLATES = {  # template text: the reason the error must give
    "sandbox": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "syntax": ("{% for m in messages %}{{ m['content'] }", "not valid Jinja"),
    "raise": ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    "python_error": ("{{ messages[0]['content'] / 0 }}", "TypeError"),
}


@pytest.mark.parametrize("kind", TEMPLATES)
@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_failing_chat_template_names_its_file_and_the_reason(kind, where, ckpt, base, capsys):
    template, reason = TEMPLATES[kind]
    if where == "chat_template.jinja":
        (ckpt / where).write_text(template)
    else:
        edit_json(ckpt / where, chat_template=template)
    out = ckpt.parent / "out"
    code, err = run(eval_cli.main, eval_args(ckpt, out, base, "--template", "chat"), capsys)
    assert_refused(code, err, where, "chat_template", reason)
    assert_nothing_written(out)


def test_a_chat_template_that_is_not_a_string_names_the_file(ckpt):
    edit_json(ckpt / "tokenizer_config.json", chat_template=42)
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: chat_template must be a string"):
        minisafe.load(ckpt)


# ---------------------------------------------------------------- flags


EVAL_FLAGS = [
    ("--batch-size", "0"), ("--batch-size", "banana"), ("--max-new-tokens", "-1"), ("--max-new-tokens", "1.5"),
    ("--limit", "0"), ("--seed", "-1"), ("--examples", "-2"), ("--device", "banana"), ("--device", "cuda:7"),
]
LOCATE_FLAGS = [
    ("--alpha", "0"), ("--alpha", "-1"), ("--alpha", "1"), ("--alpha", "nan"), ("--alpha", "inf"),
    ("--alpha", "banana"), ("--initial", "3:1"), ("--initial", "1:x"), ("--n-prompts", "0"), ("--n-prompts", "1"),
    ("--sweep", "-3"), ("--pairs", "0"), ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--seed", "-1"),
    ("--n-over-rejection", "0"), ("--device", "gpu"),
]
COMPARE_FLAGS = [("--limit", "1"), ("--top-k", "0"), ("--rank-rtol", "nan"), ("--rank-rtol", "-1"),
                 ("--batch-size", "0"), ("--seed", "-2"), ("--device", "cuda:3")]
SYNTHETIC_FLAGS = [("--pretrain-lr", "inf"), ("--safety-lr", "0"), ("--dpo-lr", "-1"), ("--beta", "nan"),
                   ("--unlearn-weight", "nan"), ("--n-layers", "0"), ("--heads", "-1"), ("--batch-size", "0"),
                   ("--eval-samples", "0"), ("--pretrain-epochs", "two")]


@pytest.mark.parametrize("flag, value", EVAL_FLAGS)
def test_eval_refuses_a_bad_numeric_flag_naming_it(flag, value, base, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(*run(eval_cli.main, eval_args(base / "tiny", out, base, flag, value), capsys), flag, value)
    assert_nothing_written(out)


@pytest.mark.parametrize("flag, value", LOCATE_FLAGS)
def test_locate_refuses_a_bad_flag_naming_it(flag, value, base, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(*run(locate_cli.main, locate_args(base / "tiny", out, base, flag, value), capsys), flag, value)
    assert_nothing_written(out)


@pytest.mark.parametrize("flag, value", COMPARE_FLAGS)
def test_mechanistic_compare_refuses_a_bad_flag_naming_it(flag, value, base, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--before", base / "tiny", "--after", base / "tiny", "--out", out, flag, value]
    assert_refused(*run(mechanistic_cli.main, argv, capsys), flag, value)
    assert_nothing_written(out)


@pytest.mark.parametrize("flag, value", SYNTHETIC_FLAGS)
def test_mechanistic_synthetic_refuses_a_bad_flag_naming_it(flag, value, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(*run(mechanistic_cli.main, ["synthetic", "--out", out, flag, value], capsys), flag, value)
    assert_nothing_written(out)


def test_locate_initial_range_beyond_the_model_names_the_flag(base, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(locate_cli.main, locate_args(base / "tiny", out, base, "--initial", "2:7"), capsys)
    assert_refused(code, err, "--initial 2:7", "3-layer model")
    assert_nothing_written(out)


def test_locate_with_a_one_prompt_set_names_the_file(base, tmp_path, capsys):
    (tmp_path / "one.txt").write_text("Say hi.\n")
    out = tmp_path / "out"
    code, err = run(locate_cli.main, locate_args(base / "tiny", out, base, "--normal", tmp_path / "one.txt"), capsys)
    assert_refused(code, err, "one.txt", "at least 2")
    assert_nothing_written(out)


def test_good_flags_still_run(base, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(locate_cli.main, locate_args(base / "tiny", out, base, "--alpha", "1.2", "--initial", "0:1",
                                                 "--sweep", "0", "--n-prompts", "2"), capsys)
    assert code == 0, err
    assert json.loads((out / "safety_layers.json").read_text())["initial"] == [0, 1]


# ---------------------------------------------------------------- output directories


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory nobody may write into. Root writes through permission bits, so for root the directory also
    refuses file creation the way a read-only mount does."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def refuse(file, flags, *args, **kwargs):
            if Path(file).parent == path and flags & os.O_CREAT:
                raise PermissionError(errno.EROFS, "Read-only file system", str(file))
            return real_open(file, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    yield path
    path.chmod(0o755)


def out_under_a_file(tmp_path: Path, read_only: Path) -> Path:
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "out"


def out_is_a_file(tmp_path: Path, read_only: Path) -> Path:
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file"


def out_read_only(tmp_path: Path, read_only: Path) -> Path:
    return read_only


def out_below_read_only(tmp_path: Path, read_only: Path) -> Path:
    return read_only / "new" / "out"


OUTS = [out_under_a_file, out_is_a_file, out_read_only, out_below_read_only]


def script_args(script: str, out: Path, base: Path) -> list:
    if script == "eval":
        return eval_args(base / "tiny", out, base)
    if script == "locate":
        return locate_args(base / "tiny", out, base)
    if script == "compare":
        return ["compare", "--before", base / "tiny", "--after", base / "tiny", "--out", out]
    return ["synthetic", "--out", out]


MAINS = {"eval": eval_cli.main, "locate": locate_cli.main, "compare": mechanistic_cli.main,
         "synthetic": mechanistic_cli.main}


@pytest.mark.parametrize("make_out", OUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("script", MAINS)
def test_an_unwritable_out_is_refused_before_any_work(script, make_out, base, tmp_path, read_only_dir, capsys,
                                                      monkeypatch):
    out = make_out(tmp_path, read_only_dir)

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr("minisafe.checkpoint.load", no_work)
    monkeypatch.setattr("minisafe.evaluation.load", no_work)
    code, err = run(MAINS[script], script_args(script, out, base), capsys)
    assert_refused(code, err, "--out", str(out))
    assert not read_only_dir.exists() or not any(read_only_dir.iterdir())


# ---------------------------------------------------------------- prompts longer than the context


LONG_PROMPT = "Explain, in every detail, " + "why the sky looks blue and the sunset red " * 8 + "?"


def test_eval_refuses_a_prompt_longer_than_the_context_naming_set_and_number(base, tmp_path, capsys):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("Say hi.\n" + LONG_PROMPT + "\n")
    out = tmp_path / "out"
    code, err = run(eval_cli.main, eval_args(base / "tiny", out, base, "--harmful", harmful), capsys)
    assert_refused(code, err, f"{harmful}: prompt 1 ('Explain, in every detail", "longer than the model's context of 256",
                   "max_position_embeddings")
    assert_nothing_written(out)


def test_locate_refuses_a_prompt_longer_than_the_context(base, tmp_path, capsys):
    normal = tmp_path / "normal.txt"
    normal.write_text("Say hi.\nName a colour.\n" + LONG_PROMPT + "\n")
    out = tmp_path / "out"
    code, err = run(locate_cli.main, locate_args(base / "tiny", out, base, "--normal", normal), capsys)
    assert_refused(code, err, f"{normal}: prompt 2 (", "context")
    assert_nothing_written(out)


def test_a_prompt_that_fits_the_context_exactly_is_encoded(base):
    _, tok = minisafe.load(base / "tiny")
    fitting = "x" * (tok.context - len(tok.prompt_ids("", "chat")))
    assert len(tok.prompt_ids(fitting, "chat")) == tok.context
    with pytest.raises(DataError, match=f"is {tok.context + 1} tokens in the chat template"):
        tok.prompt_ids(fitting + "x", "chat")


# ---------------------------------------------------------------- safety_layers.json


@pytest.mark.parametrize("contents, field", [
    ({"first": True, "last": 2}, "first"),
    ({"first": 0, "last": False}, "last"),
    ({"first": "1", "last": 2}, "first"),
    ({"first": -1, "last": 2}, "first"),
    ({"first": 1.0, "last": 2}, "first"),
    ([1, 2], "first"),
])
def test_safety_layers_json_with_wrong_types_names_file_and_field(contents, field, tmp_path):
    spec = tmp_path / "safety_layers.json"
    spec.write_text(json.dumps(contents))
    with pytest.raises(ConfigError, match=rf"safety_layers\.json: .*'{field}'"):
        read_layer_spec(str(spec))


def test_mechanistic_refuses_booleans_in_safety_layers_json(base, tmp_path, capsys):
    spec = tmp_path / "safety_layers.json"
    spec.write_text(json.dumps({"first": True, "last": 1}))
    out = tmp_path / "out"
    argv = ["compare", "--before", base / "tiny", "--after", base / "tiny", "--out", out, "--layers", spec]
    assert_refused(*run(mechanistic_cli.main, argv, capsys), "safety_layers.json", "'first'")
    assert_nothing_written(out)


# ---------------------------------------------------------------- a real process


def test_the_script_prints_one_line_and_no_traceback(base, tmp_path):
    """What a user sees: eval.py pointed at a pickle file, in a process of its own."""
    torch.save({}, tmp_path / "pytorch_model.bin")
    done = subprocess.run([sys.executable, str(REPO / "eval.py"), "--model", str(tmp_path / "pytorch_model.bin"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("eval.py: error: --model ") and "pickle" in done.stderr
    assert not (tmp_path / "out").exists()
