"""Bad checkpoints and configs give errors that name the file and the tensor or field; nothing is half-written."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisafe
from minisafe.config import load_config
from minisafe.errors import CheckpointError, ConfigError
from tiny import save_tiny


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "tiny"
    save_tiny(path, "llama")
    return path


def rewrite_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    return file


def test_pickle_checkpoint_is_refused_with_the_reason_and_the_fix(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints .* arbitrary code.*safetensors"):
        minisafe.load(ckpt)
    with pytest.raises(CheckpointError, match="pickle"):
        minisafe.load(ckpt / "pytorch_model.bin")


def test_missing_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight; unexpected none"):
        minisafe.load(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"missing none; unexpected model\.layers\.0\.extra\.weight"):
        minisafe.load(ckpt)


def test_wrong_shaped_tensor_is_named_with_both_shapes(ckpt):
    rewrite_tensors(ckpt, lambda t: t.update({"model.norm.weight": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has shape \(7,\), config\.json implies \(64,\)"):
        minisafe.load(ckpt)


def test_truncated_safetensors_file_is_named(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file \(truncated or corrupt"):
        minisafe.load(ckpt)


def test_integer_tensor_is_refused_by_name(ckpt):
    rewrite_tensors(ckpt, lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight is torch\.int8"):
        minisafe.load(ckpt)


def test_non_float_load_dtype_is_refused(ckpt):
    with pytest.raises(CheckpointError, match=r"dtype torch\.int32 cannot run the model"):
        minisafe.load(ckpt, dtype=torch.int32)


def test_missing_shard_is_named(tmp_path):
    save_tiny(tmp_path, "llama", max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard {shard.name}, which is missing"):
        minisafe.load(tmp_path)


def test_unknown_model_type_names_the_file(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'mamba' is not supported"):
        load_config(ckpt)


def test_missing_config_field_names_the_field(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: field 'hidden_size' is missing; a llama config needs it"):
        load_config(ckpt)


def test_missing_directory_and_missing_tokenizer_are_clear(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        minisafe.load(tmp_path / "nowhere")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        minisafe.load(ckpt)


def test_failed_save_leaves_neither_output_nor_temporary_files(ckpt, tmp_path, monkeypatch):
    model, tok = minisafe.load(ckpt)
    target = tmp_path / "out"

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        minisafe.save(model, tok, target)
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_save_replaces_an_existing_directory_whole(ckpt, tmp_path):
    model, tok = minisafe.load(ckpt)
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    minisafe.save(model, tok, target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
