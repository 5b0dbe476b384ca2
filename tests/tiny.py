"""Tiny random checkpoints built with transformers, one per family with every feature of the family switched on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 256 + len(SPECIALS)

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rms_norm_eps=1e-6)

# Each entry: (transformers config class name, overrides). Sliding windows are shorter than the test sequences.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8))),
    "llama_tied_bias_linear": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                                    head_dim=24, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen2_tied_sliding": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
                                               max_window_layers=1)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=32, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(head_dim=32, sliding_window=4, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(num_hidden_layers=4, num_key_value_heads=1, head_dim=32, sliding_window=4,
                                             query_pre_attn_scalar=32, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                          "full_attention"],
                                             rope_scaling=dict(rope_type="linear", factor=8.0))),
    "phi3": ("Phi3Config", dict(pad_token_id=0, sliding_window=6, original_max_position_embeddings=16,
                                max_position_embeddings=64, tie_word_embeddings=False, rope_scaling=dict(
                                    type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                                    long_factor=[2.0 + 0.5 * i for i in range(8)]))),
}


def tiny_tokenizer() -> Tokenizer:
    """Byte-level tokenizer with no merges: every byte is a token, plus ChatML specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def write_tokenizer(path: Path) -> None:
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    config = dict(bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML,
                  tokenizer_class="PreTrainedTokenizerFast")
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised transformers model of the family (eager attention: the numerical reference)."""
    import transformers

    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random norms and biases, so that a mistake in a norm's form or a bias's place shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model.eval().float()


def save_tiny(path: Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
              max_shard_size: str | None = None, **overrides):
    """Save a tiny family checkpoint with its tokenizer; returns the transformers model that was saved."""
    model = build_hf_model(family, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, **kwargs)
    write_tokenizer(path)
    return model.float()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on one thread: more only adds overhead, and runs must repeat bit for bit. Autouse where imported,
    module-wide so that module fixtures (a reference run another is compared with) run under it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
