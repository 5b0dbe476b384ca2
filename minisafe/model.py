"""The transformer behind every supported family, written once and switched by ModelConfig flags.

Reading order: RMSNorm, rotary embeddings, the attention mask, packed sequences, attention, MLP, decoder block, KV
cache, model.
Module and parameter names are the Hugging Face checkpoint names (model.layers.3.self_attn.q_proj.weight, ...),
so a checkpoint loads with a strict load_state_dict. The numbers (casts, epsilon placement, RoPE layout) follow
transformers, which the parity tests hold this file to. A faster path for CPU inference lives in fastpath.py.
"""

from __future__ import annotations

import math

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


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None
                     ) -> Tensor:
    """Softmax attention of q [B, H, T, d] over k, v [B, Hkv, S, d] as two matmuls, for the tanh softcap of Gemma 2
    that SDPA cannot apply. Grouped-query heads share k and v; mask None is causal, the queries in the last slots."""
    batch, heads, length, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    q = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)  # query head h reads kv head h // groups
    scores = (q @ k.transpose(-2, -1)).mul_(scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(1, 1, length, slots, dtype=torch.bool, device=q.device).tril(slots - length)
    scores.view(batch, kv_heads, -1, length, slots).masked_fill_(~mask.unsqueeze(2), float("-inf"))
    # A bfloat16 softmax computes in float32 and rounds once, the same numbers as softmax(float32).to(bfloat16).
    return (torch.softmax(scores, dim=-1) @ v).view(batch, heads, length, dim)


class Packed:
    """Sequences laid end to end in one row of tokens, for training without padding: the linears and norms see every
    real token once, and attention sees the sequences apart, as rows right-padded to the longest (under causal
    attention a real token never reads the padding after it).

    Leading tokens a sequence has in common with an earlier one (a chat template's system turn, a preference pair's
    prompt) are laid down once, by the first, and read by the others as their own: a token's keys and values depend
    only on it and the tokens before it. shareable[i] caps how many of sequence i's leading tokens may be taken from
    or left to another sequence (a position whose output one sequence trains on must stay its own).

    tokens [1, N] and positions [1, N] (counted within a sequence); slots [B, width], the packed token at each row's
    position (a padding slot holds token 0, read by no real token: causal attention reads earlier slots only); a
    sequence's tokens after the first it lays down itself follow one another in the packed row."""

    def __init__(self, sequences: list[list[int]], shareable: list[int], device: torch.device | str):
        self.rows, self.width = len(sequences), max(len(ids) for ids in sequences)
        tokens: list[int] = []
        positions: list[int] = []
        back: list[int] = []  # the slot each packed token comes back from: its first sequence's
        slots = [[0] * self.width for _ in sequences]
        laid: dict[tuple[int, int], int] = {}  # (packed token before, or -1; token) -> packed token, for sharing
        for row, (ids, cap) in enumerate(zip(sequences, shareable)):
            before = -1
            for t, token in enumerate(ids):
                at = laid.get((before, token), -1) if t < cap else -1
                if at < 0:
                    at = len(tokens)
                    tokens.append(token)
                    positions.append(t)
                    back.append(row * self.width + t)
                    if t < cap:
                        laid[(before, token)] = at
                slots[row][t] = before = at
        self.tokens = torch.tensor([tokens], device=device)
        self.positions = torch.tensor([positions], device=device)
        self.slots = torch.tensor(slots, device=device)
        self.tokens_at = torch.tensor(back, device=device)

    def unpack(self, t: Tensor) -> Tensor:
        """[1, H, N, d] to the rows [B, H, width, d]."""
        return t[0].index_select(1, self.slots.flatten()).unflatten(1, (self.rows, self.width)).transpose(0, 1)

    def pack(self, y: Tensor) -> Tensor:
        """The rows [B, H, width, d] back to [1, H, N, d]."""
        return y.transpose(0, 1).flatten(1, 2).index_select(1, self.tokens_at)[None]


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings, optional per-head q/k norms and a KV cache."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.sizes = [q_dim, kv_dim, kv_dim]
        if cfg.fused_qkv:  # Phi-3 keeps q, k and v as row blocks of one matrix
            self.qkv_proj = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        """q [B, T, heads * head_dim], k and v [B, T, kv_heads * head_dim]."""
        if self.cfg.fused_qkv:
            return self.qkv_proj(x).split(self.sizes, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention output [B, H, T, d] of q [B, H, T, d] over k, v [B, Hkv, S, d]."""
        cfg = self.cfg
        if cfg.attn_softcap is not None:
            return matmul_attention(q, k, v, mask, cfg.attn_scale, cfg.attn_softcap)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=cfg.attn_scale,
                                              enable_gqa=k.shape[1] != q.shape[1])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                packed: Packed | None = None) -> Tensor:
        """Attention output [B, T, D]; with a cache, the keys and values of earlier steps are attended to as well;
        packed, the sequences of x [1, N, D] attend apart, as rows (mask is then theirs)."""
        batch, length, _ = x.shape
        q, k, v = (t.unflatten(-1, (-1, self.cfg.head_dim)) for t in self.project(x))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if packed is not None:
            y = packed.pack(self.attend(packed.unpack(q), packed.unpack(k), packed.unpack(v), mask))
        else:
            y = self.attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), with SiLU or tanh-approximate GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused = cfg.fused_gate_up
        if self.fused:  # Phi-3: gate rows first, then up rows
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gelu = cfg.activation == "gelu_tanh"

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        """gate(x) and up(x)."""
        if self.fused:
            return self.gate_up_proj(x).chunk(2, dim=-1)
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: Tensor) -> Tensor:
        """The MLP's output [B, T, D]."""
        gate, up = self.project(x)
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
                packed: Packed | None = None) -> Tensor:
        """The layer's output [B, T, D]."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, packed)
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class KVCache:
    """Keys and values of every layer in buffers [B, Hkv, max_len, head_dim], filled left to right."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.length, self.max_len = 0, max_len

    def slots(self, length: int) -> int:
        """How many key slots attention reads in a step of `length` new tokens: the filled ones, this step's included."""
        end = self.length + length
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step needs {end}")
        return end

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v for `layer` after the filled slots; return the layer's first slots(T) slots."""
        start, slots = self.length, self.slots(k.shape[2])
        self.keys[layer][:, :, start : start + k.shape[2]] = k
        self.values[layer][:, :, start : start + k.shape[2]] = v
        return self.keys[layer][:, :, :slots], self.values[layer][:, :, :slots]

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows (rows that finished generating are dropped)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def share(self, prefix: KVCache) -> None:
        """Start every row with the filled slots of a one-row cache (a prompt prefix the whole batch has in common)."""
        for layer in range(len(self.keys)):
            self.keys[layer][:, :, : prefix.length] = prefix.keys[layer][:, :, : prefix.length]
            self.values[layer][:, :, : prefix.length] = prefix.values[layer][:, :, : prefix.length]
        self.length = prefix.length


class Transformer(nn.Module):
    """Decoder-only language model: embeddings, decoder layers, final norm and head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset),
        ))
        # A tied head has no weight of its own: the checkpoint has no lm_head.weight and neither does the model.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Plain float32 CPU tensors, not buffers: model.to(bfloat16) must not round the frequencies, and a model
        # built on the meta device (as the loader does) still needs real ones.
        with torch.device("cpu"):
            self.inv_freq = {kind: rope_inv_freq(rope, cfg.head_dim) for kind, rope in cfg.rope.items()}
            self.long_inv_freq = {kind: rope_inv_freq(rope, cfg.head_dim, long_context=True)
                                  for kind, rope in cfg.rope.items() if rope.kind == "longrope"}

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, model.layers.0 to model.layers.{L-1}."""
        return self.model.layers

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for batch_size rows of up to max_len positions, in the model's dtype and device."""
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, weight.dtype, weight.device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False, last_logits_only: bool = False, float_logits: bool = True,
                skip_head: bool = False, packed: Packed | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits [B, T, V] in float32 (T = 1 with last_logits_only). float_logits=False leaves them in the activation
        dtype (float32 all the same under a final softcap): greedy decoding takes the same argmax from them, without
        copying [B, V] into float32 at every step.

        attention_mask [B, past + T]: 1 = real token, 0 = padding (left padding); with a cache it covers the cached
        slots too. Positions count real tokens only, so a left-padded row gives the logits of the unpadded row.
        With return_hidden, also the output of every decoder layer (hidden[i] = output of layer i, before the
        final norm; the embedding output is not a layer). With skip_head, the final-norm hidden states instead of
        logits: the caller makes logits only where it needs them (training: at labelled positions; see logits).
        packed: input_ids is packed.tokens, sequences laid end to end (no attention_mask, no cache).
        """
        cfg = self.config
        past = cache.length if cache is not None else 0
        length = input_ids.shape[1]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the fast causal path is exact
        if packed is not None:
            positions = packed.positions
        elif attention_mask is None:
            positions = torch.arange(past, past + length, device=input_ids.device)[None]
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

        x = self.model.embed_tokens(input_ids)
        if cfg.scale_embeddings:  # Gemma; the factor is rounded to the activation dtype, as in transformers
            x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        seen = packed.width if packed is not None else length  # the queries attention sees: a row's when packed
        slots = cache.slots(length) if cache is not None else seen
        rope, masks = {}, {}
        for kind in set(cfg.layer_types):
            rope[kind] = self.rope(kind, positions, x.dtype)
            window = cfg.sliding_window if kind == SLIDING else None
            masks[kind] = attention_mask_4d(attention_mask, past, seen, slots, window)

        hidden = []
        for layer, kind in zip(self.model.layers, cfg.layer_types):
            x = layer(x, *rope[kind], masks[kind], cache, packed)
            if return_hidden:
                hidden.append(x)
        if cache is not None:
            cache.length += length

        x = self.model.norm(x[:, -1:] if last_logits_only else x)
        if skip_head:
            return x
        logits = self.logits(x, float_logits)
        return (logits, hidden) if return_hidden else logits

    def logits(self, x: Tensor, float_logits: bool = True) -> Tensor:
        """Logits of final-norm hidden states: the head, then float32 (unless float_logits=False) and any softcap."""
        logits = self.head(x)
        if float_logits or self.config.final_softcap is not None:
            logits = logits.float()
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

    def head(self, x: Tensor) -> Tensor:
        """Logits in the activation dtype: lm_head, or the embedding matrix when the head is tied to it."""
        if self.lm_head is None:
            return F.linear(x, self.model.embed_tokens.weight)
        return self.lm_head(x)

    def rope(self, kind: str, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for one layer type; longrope switches to its long factors past the original context."""
        settings = self.config.rope[kind]
        inv_freq = self.inv_freq[kind]
        if settings.kind == "longrope" and int(positions.max()) + 1 > settings.original_max_position_embeddings:
            inv_freq = self.long_inv_freq[kind]
        return rope_cos_sin(inv_freq, positions, settings.attention_factor, dtype)
