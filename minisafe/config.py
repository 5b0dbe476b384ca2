"""ModelConfig: every number and switch the model needs, read from a Hugging Face config.json.

Family differences are data. This is the one place that knows what each model_type means; model.py only reads
the flags below. Defaults for fields a config.json may omit are transformers' own defaults for that family.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minisafe.errors import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class RopeConfig:
    """Rotary embedding of one kind of layer. kind: default | linear | llama3 | longrope."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0  # llama3, longrope
    short_factor: list[float] | None = None  # longrope
    long_factor: list[float] | None = None  # longrope
    attention_factor: float = 1.0  # longrope: multiplies cos and sin
    partial_rotary_factor: float = 1.0  # share of head_dim that is rotated (Phi-3 variants)


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # family switches
    norm_unit_offset: bool = False  # Gemma: RMSNorm multiplies by (1 + w), in float32
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    activation: str = "silu"  # silu | gelu_tanh
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias
    mlp_bias: bool = False
    fused_qkv: bool = False  # Phi-3 qkv_proj
    fused_gate_up: bool = False  # Phi-3 gate_up_proj
    qk_norm: bool = False  # Gemma 3: RMSNorm on each head of q and k before RoPE
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP as well
    attn_softcap: float | None = None  # Gemma 2
    final_softcap: float | None = None  # Gemma 2
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: softmax scale is this ** -0.5
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # per layer: SLIDING or FULL
    rope: dict[str, RopeConfig] = field(default_factory=dict)  # keyed by layer type
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    hf: dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json as read; save() writes it back

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


FAMILIES = ("llama", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3")


def load_config(path: str | Path) -> ModelConfig:
    """Read a config.json (or the config.json inside a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json; a Hugging Face model directory needs one") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the dict of a Hugging Face config.json."""
    original = raw
    model_type = raw.get("model_type")
    if model_type == "gemma3":  # multimodal wrapper: the language model's config is nested
        raw = {"model_type": "gemma3_text", **raw.get("text_config", {})}
        model_type = "gemma3_text"
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; expected one of {', '.join(FAMILIES)}")
    r = _Reader(raw, source, model_type)
    is_gemma = model_type.startswith("gemma")
    num_heads = r.integer("num_attention_heads")
    hidden = r.integer("hidden_size")
    num_layers = r.integer("num_hidden_layers")
    if hidden < num_heads and raw.get("head_dim") is None:
        raise ConfigError(f"{source}: hidden_size ({hidden}) is smaller than num_attention_heads ({num_heads}), "
                          "which leaves no head_dim; set head_dim or fix the sizes")
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=r.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.integer("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=r.integer("num_key_value_heads", num_heads),
        head_dim=r.integer("head_dim", hidden // num_heads),
        max_position_embeddings=r.integer("max_position_embeddings", 4096),
        rms_norm_eps=r.number("rms_norm_eps", 1e-5 if model_type == "phi3" else 1e-6),
        tie_word_embeddings=r.flag("tie_word_embeddings", is_gemma),
        norm_unit_offset=is_gemma,
        scale_embeddings=is_gemma,
        activation=_activation(r, model_type),
        qkv_bias=model_type == "qwen2" or r.flag("attention_bias", False),
        o_bias=r.flag("attention_bias", False),
        mlp_bias=r.flag("mlp_bias", False),
        fused_qkv=model_type == "phi3",
        fused_gate_up=model_type == "phi3",
        qk_norm=model_type == "gemma3_text",
        sandwich_norms=model_type in ("gemma2", "gemma3_text"),
        attn_softcap=r.number("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
        final_softcap=r.number("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
        query_pre_attn_scalar=(r.number("query_pre_attn_scalar", 256)
                               if model_type in ("gemma2", "gemma3_text") else None),
        bos_token_id=r.get("bos_token_id", None),
        eos_token_id=as_id_list(r.get("eos_token_id", None)),
        pad_token_id=r.get("pad_token_id", None),
        hf=original,
    )
    cfg.sliding_window, cfg.layer_types = _sliding(r, model_type, num_layers)
    cfg.rope = _rope(r, model_type, cfg)
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"{source}: num_attention_heads ({cfg.num_heads}) must be a multiple of "
                          f"num_key_value_heads ({cfg.num_kv_heads})")
    return cfg


class _Reader:
    """Field access on a config dict that names the file and the field when one is missing or has the wrong type."""

    def __init__(self, raw: dict[str, Any], source: str, model_type: str):
        self.raw, self.source, self.model_type = raw, source, model_type

    def need(self, key: str) -> Any:
        if self.raw.get(key) is None:
            raise ConfigError(f"{self.source}: field {key!r} is missing; a {self.model_type} config needs it")
        return self.raw[key]

    def get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key, default)
        return default if value is None and default is not None else value

    def integer(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        """A whole-number field of at least `minimum` (sizes and counts); without a default the field is required."""
        return self.whole(key, self.need(key) if default is None else self.get(key, default), minimum)

    def whole(self, name: str, value: Any, minimum: int = 1) -> int:
        """value itself, if it is an int of at least `minimum` (not a bool, though Python counts bools as ints)."""
        if type(value) is not int or value < minimum:
            raise ConfigError(f"{self.source}: field {name!r} must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: float | None) -> float | None:
        """A positive finite number field (epsilons, bases, softcaps); None when absent without a default."""
        value = self.get(key, default)
        return None if value is None else self.positive(key, value)

    def positive(self, name: str, value: Any) -> float:
        """value as a float, if it is a finite number above zero."""
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{self.source}: field {name!r} must be a finite number > 0, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: field {key!r} must be true or false, got {value!r}")
        return value


def as_id_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _activation(r: _Reader, model_type: str) -> str:
    name = r.get("hidden_activation", None) or r.get("hidden_act", "silu")
    if model_type == "gemma" and name == "gelu":
        name = "gelu_pytorch_tanh"  # transformers runs Gemma 1 checkpoints that say "gelu" with the tanh GELU
    known = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if name not in known:
        raise ConfigError(f"{r.source}: hidden_act {name!r} is not supported; expected one of {sorted(known)}")
    return known[name]


def _sliding(r: _Reader, model_type: str, num_layers: int) -> tuple[int | None, list[str]]:
    """Which layers attend through a sliding window, and how wide it is."""
    window = r.get("sliding_window", None)
    if window is not None:
        r.whole("sliding_window", window)
    if model_type == "qwen2" and not r.get("use_sliding_window", False):
        window = None
    if model_type in ("llama", "gemma"):
        window = None
    types = r.get("layer_types", None)
    if types is None:
        if model_type == "gemma2":
            types = [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
        elif model_type == "gemma3_text":
            pattern = r.integer("sliding_window_pattern", 6)
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
        elif model_type == "qwen2" and window is not None:
            first = r.integer("max_window_layers", 28, minimum=0)
            types = [SLIDING if i >= first else FULL for i in range(num_layers)]
        elif model_type == "phi3" and window is not None:
            types = [SLIDING] * num_layers  # Phi-3 applies its window in every layer
        else:
            types = [FULL] * num_layers
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= {SLIDING, FULL}:
        raise ConfigError(f"{r.source}: layer_types must list {num_layers} entries of {SLIDING!r} / {FULL!r}")
    if SLIDING in types and not window:
        raise ConfigError(f"{r.source}: layer_types has sliding layers but sliding_window is not set")
    return (window if SLIDING in types else None), list(types)


def _rope(r: _Reader, model_type: str, cfg: ModelConfig) -> dict[str, RopeConfig]:
    """Rotary settings per layer type, from either the old (rope_theta + rope_scaling) or new (rope_parameters) form."""
    params = r.get("rope_parameters", None)
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(r.raw.get(key) or {}, dict):
            raise ConfigError(f"{r.source}: field {key!r} must be an object (or null), got {r.raw[key]!r}")
    nested = isinstance(params, dict) and set(params) & {SLIDING, FULL}
    if model_type == "gemma3_text":
        if nested:
            return {t: _rope_one(r, {"rope_theta": 1e6 if t == FULL else 1e4, **(params.get(t) or {})})
                    for t in (FULL, SLIDING)}
        full = {"rope_theta": r.get("rope_theta", 1e6), **(r.get("rope_scaling", None) or {})}
        local = {"rope_theta": r.get("rope_local_base_freq", 1e4)}
        return {FULL: _rope_one(r, full), SLIDING: _rope_one(r, local)}
    if nested:
        raise ConfigError(f"{r.source}: rope_parameters per layer type is only understood for gemma3_text")
    one = dict(params or {"rope_theta": r.get("rope_theta", 10000.0), **(r.get("rope_scaling", None) or {})})
    one.setdefault("rope_theta", r.get("rope_theta", 10000.0))
    one.setdefault("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))
    if r.raw.get("original_max_position_embeddings"):  # Phi-3 keeps it beside rope_scaling
        one["original_max_position_embeddings"] = r.raw["original_max_position_embeddings"]
    rope = _rope_one(r, one)
    if rope.kind == "longrope" and not one.get("factor"):
        rope.factor = cfg.max_position_embeddings / rope.original_max_position_embeddings
    if rope.kind == "longrope" and one.get("attention_factor") is None:
        f = rope.factor
        rope.attention_factor = 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(rope.original_max_position_embeddings))
    return {FULL: rope, SLIDING: rope}


def _rope_one(r: _Reader, p: dict[str, Any]) -> RopeConfig:
    kind = p.get("rope_type", p.get("type", "default"))
    kind = {"su": "longrope"}.get(kind, kind)
    if kind not in ("default", "linear", "llama3", "longrope"):
        raise ConfigError(f"{r.source}: rope type {kind!r} is not supported; expected default, linear, llama3 or longrope")
    rope = RopeConfig(theta=r.positive("rope_theta", p["rope_theta"]), kind=kind,
                      partial_rotary_factor=r.positive("partial_rotary_factor", p.get("partial_rotary_factor", 1.0)))
    if kind in ("linear", "llama3"):
        rope.factor = r.positive("rope_scaling.factor", _rope_field(r, p, "factor"))
    if kind == "llama3":
        rope.low_freq_factor = r.positive("rope_scaling.low_freq_factor", _rope_field(r, p, "low_freq_factor"))
        rope.high_freq_factor = r.positive("rope_scaling.high_freq_factor", _rope_field(r, p, "high_freq_factor"))
        rope.original_max_position_embeddings = r.whole("rope_scaling.original_max_position_embeddings",
                                                        _rope_field(r, p, "original_max_position_embeddings"))
    if kind == "longrope":
        rope.short_factor = _factors(r, _rope_field(r, p, "short_factor"), "rope_scaling.short_factor")
        rope.long_factor = _factors(r, _rope_field(r, p, "long_factor"), "rope_scaling.long_factor")
        rope.original_max_position_embeddings = r.whole("original_max_position_embeddings", (
            p.get("original_max_position_embeddings") or r.need("original_max_position_embeddings")))
        rope.factor = r.positive("rope_scaling.factor", p["factor"]) if p.get("factor") is not None else 0.0
        if p.get("attention_factor") is not None:
            rope.attention_factor = r.positive("rope_scaling.attention_factor", p["attention_factor"])
    return rope


def _rope_field(r: _Reader, p: dict[str, Any], key: str) -> Any:
    if p.get(key) is None:
        raise ConfigError(f"{r.source}: rope_scaling field {key!r} is missing; rope type {p.get('rope_type', p.get('type'))!r} needs it")
    return p[key]


def _factors(r: _Reader, values: Any, name: str) -> list[float]:
    """A list of positive rescale factors (longrope's short_factor and long_factor)."""
    if not isinstance(values, list):
        raise ConfigError(f"{r.source}: field {name!r} must be a list of numbers, got {values!r}")
    return [r.positive(f"{name}[{i}]", v) for i, v in enumerate(values)]
