"""The transformer behind every supported family, written once and switched by ModelConfig flags.

Reading order: RMSNorm, rotary embeddings, the attention mask, attention, linear layers, MLP, decoder block, KV cache,
model, and packed_weights (a faster matmul path for inference).
Module and parameter names are the Hugging Face checkpoint names (model.layers.3.self_attn.q_proj.weight, ...),
so a checkpoint loads with a strict load_state_dict. The numbers (casts, epsilon placement, RoPE layout) follow
transformers, which the parity tests hold this file to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minisafe.config import SLIDING, ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    """RMSNorm; Gemma's form (unit_offset) scales by (1 + w) in float32 before casting back."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int, long_context: bool = False) -> Tensor:
    """Inverse frequencies of one rotary embedding, with its scaling applied (computed once, in float32)."""
    dim = int(head_dim * rope.partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope.kind == "longrope":  # Phi-3: per-frequency factors, the long set beyond the original context
        factors = torch.tensor(rope.long_factor if long_context else rope.short_factor, dtype=torch.float32)
        return 1.0 / (factors * rope.theta**exponents)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
        context = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
        smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        ramp = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= context / rope.high_freq_factor) & (wavelen <= context / rope.low_freq_factor)
        return torch.where(medium, ramp, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, attention_factor: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin [B, T, rotary_dim] for integer positions [B, T], as apply_rope takes them.

    The two halves repeat (Hugging Face layout); the first half of sin is negated, which is the sign of rotate_half.
    """
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    cos, sin = (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, head_dim]; only the first rotary_dim channels turn when RoPE is partial.

    x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1): with the sign in sin, a roll of x is all
    that is left of it. The same numbers as transformers' form, in three operators fewer.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    out = rot * cos + rot.roll(rot.shape[-1] // 2, dims=-1) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def attention_mask_4d(padding_mask: Tensor | None, past: int, length: int, slots: int, window: int | None
                      ) -> Tensor | None:
    """Boolean [B|1, 1, T, slots] mask (True = may attend) over key slots, or None when plain causal attention is exact.

    Query t sits in slot past + t. It sees earlier slots that hold real tokens, and when the layer slides only those
    fewer than `window` real tokens back; slots after it (a KV cache's unfilled tail) are hidden by causality. A
    padding query is let see itself, so that no softmax row is empty (its output is never used). padding_mask
    covers the first past + T slots; padding may sit anywhere in it, not only on the left.
    """
    if padding_mask is None and past == 0 and slots == length and (window is None or window >= length):
        return None
    device = padding_mask.device if padding_mask is not None else None
    q = torch.arange(past, past + length, device=device)[:, None]
    k = torch.arange(slots, device=device)[None, :]
    allowed = k <= q
    if padding_mask is None:
        if window is not None:
            allowed = allowed & (q - k < window)
        return allowed[None, None]
    real = F.pad(padding_mask.bool(), (0, slots - padding_mask.shape[1]), value=True)
    allowed = allowed[None] & real[:, None, :]
    if window is not None:  # measured in positions, which skip padding, so a gap inside a row does not count
        position = real.long().cumsum(-1)
        allowed = allowed & (position[:, past : past + length, None] - position[:, None, :] < window)
    return (allowed | (k == q))[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None) -> Tensor:
    """Softmax attention of q [B, H, T, d] over k, v [B, Hkv, S, d]; grouped-query heads share k and v."""
    batch, heads, length, dim = q.shape
    if softcap is None and length > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=k.shape[1] != heads)
    # Written out for Gemma 2, whose tanh softcap SDPA cannot apply, and for one-token decoding steps, where the
    # CPU flash kernel's fixed cost per call is several times these two small matmuls (10x in bfloat16).
    kv_heads, slots = k.shape[1], k.shape[2]
    q = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)  # query head h reads kv head h // groups
    scores = (q @ k.transpose(-2, -1)).mul_(scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:  # plain causal attention, the queries in the last slots
        mask = torch.ones(1, 1, length, slots, dtype=torch.bool, device=q.device).tril(slots - length)
    scores.view(batch, kv_heads, -1, length, slots).masked_fill_(~mask.unsqueeze(2), float("-inf"))
    # A bfloat16 softmax computes in float32 and rounds once, the same numbers as softmax(float32).to(bfloat16).
    return (torch.softmax(scores, dim=-1) @ v).view(batch, heads, length, dim)


@dataclass
class PackedWeight:
    """Weights copied into oneDNN's blocked layout, and what to check that the copy is still theirs.

    Linears that read the same input (q/k/v, gate/up) are stacked by rows into one matrix, their biases beside it:
    one larger matmul instead of several small ones, with the same result for every output element.
    """
    data: Tensor
    bias: Tensor | None
    sources: list[Tensor]  # the weights and biases copied, and their version counters when they were
    versions: list[int]

    @classmethod
    def of(cls, weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> PackedWeight:
        with torch.no_grad():
            # (torch.cat copies even a single tensor: 60 ms of SmolLM2's packing in float32)
            stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
            data = torch.ops.mkldnn._reorder_linear_weight(stacked.detach())
            present = [b for b in biases if b is not None]
            bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0])
                              for w, b in zip(weights, biases)]) if present else None
        sources = [*weights, *present]
        return cls(data, bias, sources, [t._version for t in sources])

    def usable(self, x: Tensor) -> bool:
        """True unless a source changed in place since the copy, a gradient must flow, or autocast is on: the packed
        kernel has no backward and no autocast rule."""
        if torch.is_autocast_enabled(x.device.type) or [t._version for t in self.sources] != self.versions:
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in self.sources))

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.data, self.bias, "none", [], "")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: PackedWeight | None = None) -> Tensor:
    """x @ weight.T + bias, on the packed copy when there is a usable one (see packed_weights)."""
    if packed is not None and packed.usable(x):
        return packed(x)
    return F.linear(x, weight, bias)


def hooked(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward hook waits for one of these modules to run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def stackable(x: Tensor, linears: Sequence[nn.Linear], packed: PackedWeight | None) -> bool:
    """Whether `linears` can run as one matmul on their stacked packed copy: it is usable and no hook waits for one
    of them to run."""
    return packed is not None and packed.usable(x) and not hooked(linears)


class Linear(nn.Linear):
    """nn.Linear that multiplies by its packed copy while packed_weights() holds one (same parameters, same names)."""
    packed: PackedWeight | None = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if cfg.fused_qkv:  # Phi-3 keeps q, k and v as row blocks of one matrix
            self.qkv_proj = Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        else:
            self.q_proj = Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
            self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
            self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
            self.packed_qkv: PackedWeight | None = None  # q, k and v stacked, see packed_weights
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)

    def project_qkv(self, x: Tensor) -> Tensor:
        """q, k and v side by side [B, T, (heads + 2 * kv_heads) * head_dim], as Phi-3 stores them."""
        if self.cfg.fused_qkv:
            return self.qkv_proj(x)
        linears = (self.q_proj, self.k_proj, self.v_proj)
        if stackable(x, linears, self.packed_qkv):
            return self.packed_qkv(x)
        return torch.cat([m(x) for m in linears], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                last_only: bool = False) -> Tensor:
        """Attention output [B, T, D], or [B, 1, D] for the last query alone with last_only (keys and values still
        come from every position)."""
        batch, length, _ = x.shape
        heads, kv_heads = self.cfg.num_heads, self.cfg.num_kv_heads
        qkv = self.project_qkv(x).view(batch, length, heads + 2 * kv_heads, self.cfg.head_dim)
        if self.cfg.qk_norm:  # q and k have norms of their own, so they turn apart
            q = apply_rope(self.q_norm(qkv[:, :, :heads]), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, :, heads : heads + kv_heads]), cos, sin)
        else:  # side by side, q and k turn in one go
            q, k = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin).split([heads, kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, heads + kv_heads :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if last_only:
            q, mask, length = q[:, :, -1:], mask[..., -1:, :] if mask is not None else None, 1
        y = attend(q, k, v, mask, self.cfg.attn_scale, self.cfg.attn_softcap)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), with SiLU or tanh-approximate GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused = cfg.fused_gate_up
        if self.fused:  # Phi-3: gate rows first, then up rows
            self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        else:
            self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.packed_gate_up: PackedWeight | None = None  # gate and up stacked, see packed_weights
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gelu = cfg.activation == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        elif stackable(x, (self.gate_proj, self.up_proj), self.packed_gate_up):
            gate, up = self.packed_gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class Block(nn.Module):
    """Pre-norm decoder layer. With sandwich norms (Gemma 2/3) the attention and MLP outputs are normed too."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        eps, offset = cfg.rms_norm_eps, cfg.norm_unit_offset
        self.sandwich = cfg.sandwich_norms
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.self_attn = Attention(cfg, layer)
        # In Llama-style checkpoints "post_attention_layernorm" is the norm before the MLP; in Gemma 2/3 it norms
        # the attention output and "pre_feedforward_layernorm" comes before the MLP.
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                last_only: bool = False) -> Tensor:
        """The layer's output [B, T, D]; with last_only, [B, 1, D] at the last position alone (which is all the
        logits of the last position need from the last layer)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, last_only)
        if last_only:
            x = x[:, -1:]
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class KVCache:
    """Keys and values of every layer in buffers [B, Hkv, capacity, head_dim], filled left to right, up to max_len.

    A one-token step reads a layer's whole buffer and the mask hides the slots not filled yet (as gpt-fast does): a
    slice of the filled slots would be strided, and CPU bfloat16 matmuls copy strided operands, which costs more than
    the masked tail. So that the tail stays short, a buffer holds the filled slots and at most `grow` more; when it is
    full it is copied into one `grow` slots longer (measured: a step over 80 filled slots of 112 took 1.4x one over a
    buffer of 80 in bfloat16, 1.6x in float32). A prompt reads only the filled slots.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                 grow: int = 16):
        empty = torch.zeros(batch_size, cfg.num_kv_heads, 0, cfg.head_dim, dtype=dtype, device=device)
        self.keys, self.values = [empty] * cfg.num_layers, [empty] * cfg.num_layers
        self.length, self.max_len, self.grow = 0, max_len, grow

    def slots(self, length: int) -> int:
        """How many key slots attention reads in a step of `length` new tokens: the whole buffer (as it is after this
        step) for one token, only the filled slots for a prompt (SDPA takes strided keys as they are)."""
        end = self.length + length
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step needs {end}")
        return end if length > 1 else self._capacity(end)

    def _capacity(self, end: int) -> int:
        """The length of a buffer that must hold `end` slots: its own if that is enough, else `grow` - 1 beyond end,
        or max_len where less than `grow` would be left beyond that (so that the last copy is not for a few slots).
        It reads the last layer's buffer, the one a step grows last, so every layer of a step gets the same answer."""
        current = self.keys[-1].shape[2]
        if end <= current:
            return current
        capacity = end + self.grow - 1
        return self.max_len if capacity + self.grow > self.max_len else capacity

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v for `layer` after the filled slots; return the layer's first slots(T) slots."""
        start, slots = self.length, self.slots(k.shape[2])
        end = start + k.shape[2]
        self._make_room(layer, end)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :slots], self.values[layer][:, :, :slots]

    def _make_room(self, layer: int, end: int) -> None:
        """Copy `layer`'s buffers into longer ones (see _capacity) if they hold fewer than `end` slots."""
        if end > self.keys[layer].shape[2]:
            capacity = self._capacity(end)
            self.keys[layer] = _longer(self.keys[layer], capacity)
            self.values[layer] = _longer(self.values[layer], capacity)

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows (rows that finished generating are dropped)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def share(self, prefix: KVCache) -> None:
        """Start every row with the filled slots of a one-row cache (a prompt prefix the whole batch has in common)."""
        for layer in range(len(self.keys)):
            self._make_room(layer, prefix.length)
            self.keys[layer][:, :, : prefix.length] = prefix.keys[layer][:, :, : prefix.length]
            self.values[layer][:, :, : prefix.length] = prefix.values[layer][:, :, : prefix.length]
        self.length = prefix.length


def _longer(buffer: Tensor, capacity: int) -> Tensor:
    """A KV buffer copied into one of `capacity` slots. The new slots are zero: a masked slot's value still meets a
    zero attention weight, and 0 * NaN would not be 0."""
    longer = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
    longer[:, :, : buffer.shape[2]] = buffer
    longer[:, :, buffer.shape[2] :] = 0
    return longer


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset),
        ))
        # A tied head has no weight of its own: the checkpoint has no lm_head.weight and neither does the model.
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.packed_embedding: PackedWeight | None = None  # the tied head's packed copy, see packed_weights
        # Plain float32 CPU tensors, not buffers: model.to(bfloat16) must not round the frequencies, and a model
        # built on the meta device (as the loader does) still needs real ones.
        with torch.device("cpu"):
            self.inv_freq = {kind: rope_inv_freq(rope, cfg.head_dim) for kind, rope in cfg.rope.items()}
            self.long_inv_freq = {kind: rope_inv_freq(rope, cfg.head_dim, long_context=True)
                                  for kind, rope in cfg.rope.items() if rope.kind == "longrope"}

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False, last_logits_only: bool = False, float_logits: bool = True,
                skip_head: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits [B, T, V] in float32 (T = 1 with last_logits_only). float_logits=False leaves them in the activation
        dtype (float32 all the same under a final softcap): greedy decoding takes the same argmax from them, without
        copying [B, V] into float32 at every step.

        attention_mask [B, past + T]: 1 = real token, 0 = padding (left padding); with a cache it covers the cached
        slots too. Positions count real tokens only, so a left-padded row gives the logits of the unpadded row.
        With return_hidden, also the output of every decoder layer (hidden[i] = output of layer i, before the
        final norm; the embedding output is not a layer). With skip_head, the final-norm hidden states instead of
        logits (see head).
        """
        cfg = self.config
        past = cache.length if cache is not None else 0
        length = input_ids.shape[1]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the fast causal path is exact
        if attention_mask is None:
            positions = torch.arange(past, past + length, device=input_ids.device)[None]
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

        x = self.model.embed_tokens(input_ids)
        if cfg.scale_embeddings:  # Gemma; the factor is rounded to the activation dtype, as in transformers
            x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        slots = cache.slots(length) if cache is not None else length
        rope, masks = {}, {}
        for kind in set(cfg.layer_types):
            rope[kind] = self.rope(kind, positions, x.dtype)
            window = cfg.sliding_window if kind == SLIDING else None
            masks[kind] = attention_mask_4d(attention_mask, past, length, slots, window)

        hidden = []
        # Only the last position's logits wanted: the last layer needs every position's keys and values, but the
        # rest of its work (3% of a 30-layer prompt pass) only at the last position. A layer with a hook on it (or on
        # a part of it) runs in full, so that the hook sees every position.
        last_only = last_logits_only and not return_hidden and not hooked(self.model.layers[-1].modules())
        for i, (layer, kind) in enumerate(zip(self.model.layers, cfg.layer_types)):
            x = layer(x, *rope[kind], masks[kind], cache, last_only and i == cfg.num_layers - 1)
            if return_hidden:
                hidden.append(x)
        if cache is not None:
            cache.length += length

        x = self.model.norm(x[:, -1:] if last_logits_only else x)
        if skip_head:  # the caller applies self.head where it needs logits (training: labelled positions only)
            return x
        logits = self.head(x, float_logits)
        return (logits, hidden) if return_hidden else logits

    def head(self, x: Tensor, float_logits: bool = True) -> Tensor:
        """Logits of final-norm hidden states x [..., hidden]: the output layer (tied or not) and Gemma 2's softcap."""
        cfg = self.config
        if self.lm_head is None:
            logits = linear(x, self.model.embed_tokens.weight, packed=self.packed_embedding)
        else:
            logits = self.lm_head(x)
        if float_logits or cfg.final_softcap is not None:
            logits = logits.float()
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits

    def rope(self, kind: str, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for one layer type; longrope switches to its long factors past the original context."""
        settings = self.config.rope[kind]
        inv_freq = self.inv_freq[kind]
        if settings.kind == "longrope" and int(positions.max()) + 1 > settings.original_max_position_embeddings:
            inv_freq = self.long_inv_freq[kind]
        return rope_cos_sin(inv_freq, positions, settings.attention_factor, dtype)


def packing_plan(model: Transformer) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
    """Where packed copies go, as (module, attribute, linears copied): each layer's q/k/v and gate/up stacked, every
    other linear on its own."""
    plan: list[tuple[nn.Module, str, list[nn.Linear]]] = []
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        if not attn.cfg.fused_qkv:
            plan.append((attn, "packed_qkv", [attn.q_proj, attn.k_proj, attn.v_proj]))
        if not mlp.fused:
            plan.append((mlp, "packed_gate_up", [mlp.gate_proj, mlp.up_proj]))
    stacked = {id(m) for _, _, linears in plan for m in linears}
    return plan + [(m, "packed", [m]) for m in model.modules() if isinstance(m, Linear) and id(m) not in stacked]


@contextmanager
def packed_weights(model: Transformer) -> Iterator[None]:
    """Inside this block, inference matmuls run on copies of the weights prepacked for oneDNN; on exit they are dropped.

    Why: in float32, F.linear calls MKL's GEMM, which on some CPUs (an AMD EPYC with AVX-512, where this was measured)
    reaches 40% of oneDNN's speed; on others the two are within 15%. In bfloat16, F.linear already uses oneDNN but
    reorders the weight at every call: 30% of the projections' time at decoding sizes. q/k/v and gate/up are stacked,
    so each layer makes four matmuls instead of seven. bfloat16 results are bit-identical to F.linear's; float32 ones
    differ in rounding only (another summation order). The copies cost one more set of weights while the block runs.
    A weight changed in place inside the block, one that needs a gradient, and autocast take F.linear, so a stale copy
    is never used; a forward hook on q_proj (say) still sees its module run. Nested blocks reuse the outer block's
    copies. Other devices and dtypes, or a CPU without oneDNN's bfloat16 kernels: a no-op.
    """
    weight = model.model.embed_tokens.weight
    plan = packing_plan(model)
    usable = (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
              and (weight.dtype == torch.float32
                   or weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    if not usable or any(getattr(owner, attribute) is not None for owner, attribute, _ in plan):
        yield
        return
    try:
        for owner, attribute, linears in plan:
            setattr(owner, attribute, PackedWeight.of([m.weight for m in linears], [m.bias for m in linears]))
        if model.lm_head is None:
            model.packed_embedding = PackedWeight.of([weight], [None])
        yield
    finally:
        for owner, attribute, _ in plan:
            setattr(owner, attribute, None)
        model.packed_embedding = None
