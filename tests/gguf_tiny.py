"""Tiny GGUF files written the way llama.cpp's converter writes them, for fast tests of tools/weights.py.

`write_tiny_gguf(path, arch)` writes a small random model of family llama, qwen2 or gemma3 with a small real
tokenizer (byte-level BPE for llama / qwen2, SentencePiece-style BPE with byte fallback for gemma3), some tensors
quantized to Q8_0, llama's q/k rows permuted and gemma's norms stored as 1 + w, as llama.cpp does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from transformers.convert_slow_tokenizer import bytes_to_unicode

HIDDEN, FFN, HEADS, KV_HEADS = 64, 128, 4, 2
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for llama: within each head, the two rotary halves interleaved row by row."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of a small GPT-2-style vocabulary with ChatML special tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "1 2"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = specials + alphabet + merged + ["<tool_call>"]
    types = [3] * len(specials) + [1] * (len(alphabet) + len(merged)) + [4]
    return tokens, types, merges


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """Tokens, token types and scores of a small Gemma-style vocabulary: no merges stored, byte fallback tokens,
    whitespace runs stored with real spaces, newlines as user-defined tokens."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    user = ["\n", "\n\n", "  ", "   "]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += list("0123456789.,!?'-") + ["é", "日"]
    pieces = ["▁t", "he", "▁the", "in", "▁a", "er", "▁in", "ing", "▁th", "▁thing", "ll", "▁he", "▁hell", "lo"]
    tokens = control + user + byte_tokens + chars + pieces
    types = [3] * len(control) + [4] * len(user) + [6] * len(byte_tokens) + [1] * (len(chars) + len(pieces))
    scores = [-float(i) for i in range(len(tokens))]
    return tokens, types, scores


def _metadata(arch: str, layers: int, head_dim: int, vocab: int) -> dict[str, tuple]:
    """Key -> (value, type[, array item type]) as llama.cpp's converter writes them."""
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    meta = {
        f"{arch}.block_count": (layers, u32), f"{arch}.context_length": (256, u32),
        f"{arch}.embedding_length": (HIDDEN, u32), f"{arch}.feed_forward_length": (FFN, u32),
        f"{arch}.attention.head_count": (HEADS, u32), f"{arch}.attention.head_count_kv": (KV_HEADS, u32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5 if arch == "llama" else 1e-6, f32),
        f"{arch}.rope.freq_base": (10000.0 if arch == "llama" else 1e6, f32),
    }
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = (head_dim, u32)
        meta[f"{arch}.vocab_size"] = (vocab, u32)
    if arch == "gemma3":
        meta[f"{arch}.attention.key_length"] = (head_dim, u32)
        meta[f"{arch}.attention.value_length"] = (head_dim, u32)
        meta[f"{arch}.attention.sliding_window"] = (8, u32)
    return meta


def _tokenizer_metadata(arch: str) -> dict[str, tuple]:
    s, arr, b, u32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.BOOL, GGUFValueType.UINT32
    if arch == "gemma3":
        tokens, types, scores = sentencepiece_vocab()
        return {"tokenizer.ggml.model": ("llama", s), "tokenizer.ggml.pre": ("default", s),
                "tokenizer.ggml.tokens": (tokens, arr, s), "tokenizer.ggml.scores": (scores, arr, GGUFValueType.FLOAT32),
                "tokenizer.ggml.token_type": (types, arr, GGUFValueType.INT32),
                "tokenizer.ggml.bos_token_id": (2, u32), "tokenizer.ggml.eos_token_id": (1, u32),
                "tokenizer.ggml.unknown_token_id": (3, u32), "tokenizer.ggml.padding_token_id": (0, u32),
                "tokenizer.ggml.add_bos_token": (True, b), "tokenizer.ggml.add_eos_token": (False, b),
                "tokenizer.ggml.add_space_prefix": (False, b)}
    tokens, types, merges = byte_level_vocab()
    return {"tokenizer.ggml.model": ("gpt2", s), "tokenizer.ggml.pre": ("smollm" if arch == "llama" else "qwen2", s),
            "tokenizer.ggml.tokens": (tokens, arr, s), "tokenizer.ggml.token_type": (types, arr, GGUFValueType.INT32),
            "tokenizer.ggml.merges": (merges, arr, s),
            "tokenizer.ggml.bos_token_id": (1, u32), "tokenizer.ggml.eos_token_id": (2, u32),
            "tokenizer.ggml.padding_token_id": (0, u32), "tokenizer.ggml.add_bos_token": (False, b),
            "tokenizer.chat_template": (CHATML, s)}


def vocab_size(arch: str) -> int:
    return len(sentencepiece_vocab()[0] if arch == "gemma3" else byte_level_vocab()[0])


def _tensors(arch: str, layers: int, head_dim: int, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """GGUF-named tensors in Hugging Face orientation [out, in], with llama.cpp's layout changes applied."""
    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # near 1 in the file: llama's w is near 1; for gemma llama.cpp stores 1 + w
        return 1.0 + rng.standard_normal(n).astype(np.float32) * 0.1

    q_rows, kv_rows = HEADS * head_dim, KV_HEADS * head_dim
    t = {"token_embd.weight": mat(vocab, HIDDEN), "output_norm.weight": norm(HIDDEN)}
    if arch == "llama":
        t["output.weight"] = mat(vocab, HIDDEN)  # untied here; qwen2 and gemma3 tie
    for i in range(layers):
        p = f"blk.{i}."
        t |= {p + "attn_norm.weight": norm(HIDDEN), p + "ffn_norm.weight": norm(HIDDEN),
              p + "attn_q.weight": mat(q_rows, HIDDEN), p + "attn_k.weight": mat(kv_rows, HIDDEN),
              p + "attn_v.weight": mat(kv_rows, HIDDEN), p + "attn_output.weight": mat(HIDDEN, q_rows),
              p + "ffn_gate.weight": mat(FFN, HIDDEN), p + "ffn_up.weight": mat(FFN, HIDDEN),
              p + "ffn_down.weight": mat(HIDDEN, FFN)}
        if arch == "qwen2":
            t |= {p + f"attn_{x}.bias": rng.standard_normal(n).astype(np.float32) * 0.1
                  for x, n in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))}
        if arch == "gemma3":
            t |= {p + "post_attention_norm.weight": norm(HIDDEN), p + "post_ffw_norm.weight": norm(HIDDEN),
                  p + "attn_q_norm.weight": norm(head_dim), p + "attn_k_norm.weight": norm(head_dim)}
        if arch == "llama":
            t[p + "attn_q.weight"] = llamacpp_permute(t[p + "attn_q.weight"], HEADS)
            t[p + "attn_k.weight"] = llamacpp_permute(t[p + "attn_k.weight"], KV_HEADS)
    return t


def write_tiny_gguf(path: str | Path, arch: str = "llama", seed: int = 0, drop_keys: tuple[str, ...] = (),
                    declared_arch: str | None = None) -> Path:
    """Write a tiny random `arch` model (llama, qwen2 or gemma3) to `path`. drop_keys leaves metadata keys out;
    declared_arch writes another general.architecture (to test refusals)."""
    rng = np.random.default_rng(seed)
    layers = 6 if arch == "gemma3" else 2  # gemma3: five sliding layers, then a global one
    head_dim = 256 if arch == "gemma3" else HIDDEN // HEADS  # gemma3: what transformers assumes for the query scale
    vocab = vocab_size(arch)
    writer = GGUFWriter(str(path), declared_arch or arch)
    for key, spec in {**_metadata(arch, layers, head_dim, vocab), **_tokenizer_metadata(arch)}.items():
        if key not in drop_keys:
            writer.add_key_value(key, *spec)
    for i, (name, w) in enumerate(_tensors(arch, layers, head_dim, vocab, rng).items()):
        if w.ndim == 2 and w.shape[1] % 32 == 0 and i % 2:  # every other matrix as Q8_0, as real files mix types
            writer.add_tensor(name, quantize(w, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
