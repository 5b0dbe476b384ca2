"""Faster paths on the CPU: `with fast_inference(model):` for inference, `with fast_training(model):` for training
(attention written out as two matmuls, see short_enough_to_train; under autocast the linears multiply by bfloat16
copies of their weights kept between steps, prepacked for oneDNN, see CastWeights; the linears', the embedding's and
the head's weight gradients added straight into .grad, see LinearRows, EmbeddingRows and HeadRows).

Inside the block some methods of the model's modules are swapped for faster ones that compute the same thing, and
on exit the originals come back (also when an exception escapes):
- nn.Linear.forward (and a tied head) multiplies by a copy of the weight prepacked for oneDNN. In float32, F.linear
  calls MKL's GEMM, which on some CPUs is far slower than oneDNN; in bfloat16, F.linear already uses oneDNN but
  reorders the weight at every call. bfloat16 results are bit-identical to F.linear's; float32 ones differ in
  rounding only (another summation order).
- Attention.project and MLP.project multiply q/k/v and gate/up as one stacked matrix each: fewer, larger matmuls,
  the same result for every output element.
- Attention.attend writes a one-token decoding step out as two small matmuls: the CPU flash kernel behind SDPA has a
  fixed cost per call that is several times theirs.
- Transformer.new_cache gives a cache whose buffers grow a few slots at a time, and a decoding step reads a layer's
  whole buffer, its unfilled tail masked: a slice of the filled slots would be strided, and CPU bfloat16 matmuls
  copy strided operands first, which costs more than a short masked tail.

Forward hooks keep firing: every module is still called, and a stacked projection whose parts have a hook waiting
takes the separate ones. A weight changed in place inside the block (scaled_layers, an optimizer step) is packed
again before its next use; a pass that needs a gradient, and autocast, take F.linear (the packed kernel has no
backward and no autocast rule). The packed copies cost one more set of weights while the block runs. Nested blocks
reuse the outer one's swaps. Off the CPU it does nothing; where oneDNN cannot pack the dtype, it does not pack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from minisafe.config import ModelConfig
from minisafe.model import Attention, KVCache, Transformer, matmul_attention

_active: set[int] = set()  # id() of the models inside a fast_inference block


def changed_since(sources: list[Tensor], copied: list[tuple[Tensor, int]]) -> bool:
    """Whether a tensor has been written in place or replaced since a copy of it was made; copied holds each
    (tensor, its version then): in-place writes bump a tensor's version."""
    return len(sources) != len(copied) or any(t is not s or t._version != version
                                              for t, (s, version) in zip(sources, copied))


class PackedLinear:
    """The weights of linears that read the same input, stacked by rows and copied into oneDNN's blocked layout.

    `modules` hold the weights (nn.Linear, or the nn.Embedding of a tied head); the copy is remade when one of their
    tensors has changed since it was made.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.pack()

    def sources(self) -> list[Tensor]:
        """The weights and biases copied, as the modules hold them now."""
        return [t for m in self.modules for t in (m.weight, getattr(m, "bias", None)) if t is not None]

    def pack(self) -> None:
        """Copy the weights, stacked, into the blocked layout, and their biases (zeros where one has none) beside them."""
        with torch.no_grad():
            weights = [m.weight.detach() for m in self.modules]
            biases = [getattr(m, "bias", None) for m in self.modules]
            stacked = weights[0] if len(weights) == 1 else torch.cat(weights)  # cat would copy a lone weight too
            self.data = torch.ops.mkldnn._reorder_linear_weight(stacked)
            self.bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        self.copied = [(t, t._version) for t in self.sources()]  # in-place writes bump a tensor's version

    def usable(self, x: Tensor) -> bool:
        """Whether the packed kernel may stand in for F.linear on x; packs again first if a source has changed."""
        sources = self.sources()
        if torch.is_autocast_enabled(x.device.type):
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return False
        if changed_since(sources, self.copied):
            self.pack()
        return True

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.data, self.bias, "none", [], "")


def packable(weight: Tensor) -> bool:
    """Whether oneDNN can pack this weight: on a CPU, in float32, or in bfloat16 where the CPU has its kernels."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16
                                             and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def hooked(modules: Sequence[nn.Module]) -> bool:
    """Whether a forward hook waits for one of these modules to run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def packed_forward(plain: Callable[[Tensor], Tensor], packed: PackedLinear) -> Callable[[Tensor], Tensor]:
    """A forward that multiplies by the packed copy where it may, and calls `plain` where it may not."""
    def forward(x: Tensor) -> Tensor:
        return packed(x) if packed.usable(x) else plain(x)
    return forward


def stacked_projection(plain: Callable[[Tensor], tuple[Tensor, ...]], linears: Sequence[nn.Linear],
                       split: Callable[[Tensor], tuple[Tensor, ...]]) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """A project method that runs `linears` as one packed matmul and splits its output into theirs; while a hook
    waits on one of them, `plain` calls them one by one."""
    packed = PackedLinear(linears)

    def project(x: Tensor) -> tuple[Tensor, ...]:
        if hooked(linears) or not packed.usable(x):
            return plain(x)
        return split(packed(x))
    return project


def matmul_attend(attention: Attention, use_matmul: Callable[[Tensor, Tensor], bool]) -> Callable[..., Tensor]:
    """An attend method that writes attention out as two matmuls (matmul_attention) where use_matmul(q, k) says so,
    and leaves the rest to the original."""
    plain, cfg = attention.attend, attention.cfg

    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if not use_matmul(q, k):
            return plain(q, k, v, mask)
        return matmul_attention(q, k, v, mask, cfg.attn_scale, cfg.attn_softcap)
    return attend


def one_token_step(q: Tensor, k: Tensor) -> bool:
    """Decoding: a one-token step is written out as matmuls; a prompt keeps the fused kernel."""
    return q.shape[2] <= 1


class GrowingKVCache(KVCache):
    """A KV cache whose buffers hold the filled slots and at most `grow` more, and which a one-token step reads whole.

    When a buffer is full it is copied into one `grow` slots longer, so the masked tail a step reads stays short.
    A prompt reads only the filled slots (SDPA takes strided keys as they are).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, grow: int = 16):
        empty = torch.zeros(batch_size, cfg.num_kv_heads, 0, cfg.head_dim, dtype=dtype, device=device)
        self.keys, self.values = [empty] * cfg.num_layers, [empty] * cfg.num_layers
        self.length, self.max_len, self.grow = 0, max_len, grow

    def slots(self, length: int) -> int:
        """The whole buffer (as it is after this step) for one new token, only the filled slots for a prompt."""
        end = super().slots(length)
        return end if length > 1 else self.capacity(end)

    def capacity(self, end: int) -> int:
        """The length of a buffer that must hold `end` slots: its own if that is enough, else `grow` - 1 beyond end,
        or max_len where less than `grow` would be left beyond that (so that the last copy is not for a few slots).
        It reads the last layer's buffer, the one a step grows last, so every layer of a step gets the same answer."""
        current = self.keys[-1].shape[2]
        if end <= current:
            return current
        capacity = end + self.grow - 1
        return self.max_len if capacity + self.grow > self.max_len else capacity

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.make_room(layer, self.length + k.shape[2])
        return super().update(layer, k, v)

    def share(self, prefix: KVCache) -> None:
        for layer in range(len(self.keys)):
            self.make_room(layer, prefix.length)
        super().share(prefix)

    def make_room(self, layer: int, end: int) -> None:
        """Copy `layer`'s buffers into longer ones (see capacity) if they hold fewer than `end` slots."""
        if end > self.keys[layer].shape[2]:
            capacity = self.capacity(end)
            self.keys[layer] = longer(self.keys[layer], capacity)
            self.values[layer] = longer(self.values[layer], capacity)


def longer(buffer: Tensor, capacity: int) -> Tensor:
    """A KV buffer copied into one of `capacity` slots. The new slots are zero: a masked slot's value still meets a
    zero attention weight, and 0 * NaN would not be 0."""
    out = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
    out[:, :, : buffer.shape[2]] = buffer
    out[:, :, buffer.shape[2] :] = 0
    return out


def growing_cache(model: Transformer) -> Callable[[int, int], KVCache]:
    """A new_cache method that makes GrowingKVCaches."""
    def new_cache(batch_size: int, max_len: int) -> KVCache:
        weight = model.model.embed_tokens.weight
        return GrowingKVCache(model.config, batch_size, max_len, weight.dtype, weight.device)
    return new_cache


def packed_methods(model: Transformer) -> list[tuple[nn.Module, str, Callable]]:
    """(module, method name, replacement) for the packed matmuls: each layer's q/k/v and gate/up stacked, every other
    linear on its own, and a tied head."""
    swaps: list[tuple[nn.Module, str, Callable]] = []
    stacked: set[int] = set()  # id() of the linears that run stacked
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        if not attn.cfg.fused_qkv:
            linears = [attn.q_proj, attn.k_proj, attn.v_proj]
            split = (lambda y, sizes=attn.sizes: y.split(sizes, dim=-1))
            swaps.append((attn, "project", stacked_projection(attn.project, linears, split)))
            stacked.update(map(id, linears))
        if not mlp.fused:
            linears = [mlp.gate_proj, mlp.up_proj]
            swaps.append((mlp, "project", stacked_projection(mlp.project, linears, lambda y: y.chunk(2, dim=-1))))
            stacked.update(map(id, linears))
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in stacked:
            swaps.append((m, "forward", packed_forward(m.forward, PackedLinear([m]))))
    if model.lm_head is None:
        swaps.append((model, "head", packed_forward(model.head, PackedLinear([model.model.embed_tokens]))))
    return swaps


def fast_methods(model: Transformer) -> list[tuple[nn.Module, str, Callable]]:
    """Every swap fast_inference makes on this model, as (module, method name, replacement)."""
    swaps: list[tuple[nn.Module, str, Callable]] = [(model, "new_cache", growing_cache(model))]
    swaps += [(block.self_attn, "attend", matmul_attend(block.self_attn, one_token_step)) for block in model.layers]
    if packable(model.model.embed_tokens.weight):
        swaps += packed_methods(model)
    return swaps


@contextmanager
def fast_inference(model: Transformer) -> Iterator[None]:
    """Inside this block the model runs the CPU speed path described at the top of this module; on exit, its own
    methods again."""
    if id(model) in _active or model.model.embed_tokens.weight.device.type != "cpu":
        yield
        return
    _active.add(id(model))
    try:
        with swapped(fast_methods(model)):
            yield
    finally:
        _active.discard(id(model))


@contextmanager
def swapped(swaps: list[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """Set each (module, name, method) as an instance attribute, which hides the class's method; restore on exit."""
    hidden = [module.__dict__.get(name) for module, name, _ in swaps]  # instance attributes a swap would hide
    try:
        for module, name, method in swaps:
            setattr(module, name, method)
        yield
    finally:
        for (module, name, _), before in zip(swaps, hidden):
            if before is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, before)


# ---------------------------------------------------------------- training

# Up to this many positions, training attention runs as two matmuls (matmul_attention): at the lengths the pipeline
# trains on, the backward of the fused CPU kernel behind SDPA costs several times theirs. Longer sequences keep the
# fused kernel, which never holds the whole score matrix.
MATMUL_TRAINING_LENGTH = 512


def short_enough_to_train(q: Tensor, k: Tensor) -> bool:
    """Training: two matmuls up to MATMUL_TRAINING_LENGTH positions, the fused kernel beyond."""
    return k.shape[2] <= MATMUL_TRAINING_LENGTH


class EmbeddingRows(torch.autograd.Function):
    """An embedding lookup whose backward adds each looked-up row's gradient straight into weight.grad.

    The stock backward first builds a dense zero gradient of the whole vocabulary (a tied head's gradient is added
    to it afterwards): for a model of this size that is a large fresh buffer in every pass, which costs more to
    allocate and fill than the rows cost to add. The weight's own gradient edge gets None; the head's gradient, if
    the weight is tied, reaches the same .grad through autograd as usual, after this."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None]:
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, ids.flatten(), grad.flatten(0, -2).to(weight.dtype))
        return None, None


def plain_gradient_wanted(weight: Tensor) -> bool:
    """Whether a weight keeps autograd's own gradient path: it needs no gradient here (frozen, or no grad mode), it
    has gradient hooks (which must see the whole gradient), or it is sharded."""
    return (not (torch.is_grad_enabled() and weight.requires_grad) or bool(weight._backward_hooks)
            or isinstance(weight, DTensor))


def row_gradient_embedding(embedding: nn.Embedding) -> Callable[[Tensor], Tensor]:
    """A forward for `embedding` that takes EmbeddingRows where a plain weight needs a gradient; the original where
    plain_gradient_wanted, or where a padding row must get none."""
    plain = embedding.forward

    def forward(ids: Tensor) -> Tensor:
        weight = embedding.weight
        if plain_gradient_wanted(weight) or embedding.padding_idx is not None:
            return plain(ids)
        return EmbeddingRows.apply(weight, ids)
    return forward


class CastWeights:
    """Weights stacked by rows in a lower dtype, in one buffer that stays from call to call: autocast casts each
    weight into a fresh buffer at every step (and a frozen one at every pass), and a fresh buffer of this size costs
    page faults. Weights written in place (an optimizer step) or replaced since the last call are copied in again.
    With `packed` (where oneDNN can pack the dtype), a copy of the stack in oneDNN's blocked layout is kept beside
    it and made again with it: F.linear reorders a bfloat16 weight into that layout at every call."""

    def __init__(self, packed: bool = False) -> None:
        self.low: Tensor | None = None
        self.blocked: Tensor | None = None
        self.packed = packed
        self.copied: list[tuple[Tensor, int]] = []

    def __call__(self, weights: list[Tensor], dtype: torch.dtype) -> Tensor:
        shape = (sum(w.shape[0] for w in weights), weights[0].shape[1])
        fresh = self.low is None or self.low.dtype != dtype or tuple(self.low.shape) != shape
        if fresh:
            self.low = torch.empty(shape, dtype=dtype, device=weights[0].device)
        if fresh or changed_since(weights, self.copied):
            # Slice by slice: torch.cat(out=) into another dtype first makes a whole copy in the weights' dtype.
            for rows, w in zip(self.low.split([w.shape[0] for w in weights]), weights):
                rows.copy_(w.detach())
            self.copied = [(w, w._version) for w in weights]
            pack = self.packed and packable(self.low)
            self.blocked = torch.ops.mkldnn._reorder_linear_weight(self.low) if pack else None
        return self.low

    def linear(self, x: Tensor, low: Tensor) -> Tensor:
        """x @ low.T: by the blocked copy where low is the stack this holds and there is one (the same numbers as
        F.linear's), else F.linear."""
        if self.blocked is None or low is not self.low:
            return F.linear(x, low)
        return torch.ops.mkldnn._linear_pointwise(x, self.blocked, None, "none", [], "")


# Vocabulary rows of the head's weight gradient made and added to .grad at a time: the float32 sum of a bfloat16
# gradient goes through a float32 copy of it, which at this size stays in cache.
HEAD_ROWS = 2048


class HeadRows(torch.autograd.Function):
    """The output layer, logits = x @ low.T with `low` the head weight in x's dtype, whose backward adds the weight's
    gradient straight into weight.grad (float32 += bfloat16, in place).

    Under autocast the stock path copies the bfloat16 gradient of the whole vocabulary matrix into a fresh float32
    buffer in every pass before adding it to .grad; that copy costs about as much as the gradient's matmul. The
    weight's own gradient edge gets None; with a tied head, EmbeddingRows adds the embedding's rows to the same
    .grad. The gradient is made and added HEAD_ROWS rows at a time, never as a whole matrix."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, low: Tensor) -> Tensor:
        ctx.save_for_backward(x, low)
        ctx.weight = weight
        return F.linear(x, low)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        x, low = ctx.saved_tensors
        weight = ctx.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad_rows, x_rows = grad.flatten(0, -2), x.flatten(0, -2)
        for start in range(0, weight.shape[0], HEAD_ROWS):
            rows = slice(start, start + HEAD_ROWS)
            weight.grad[rows].add_(grad_rows[:, rows].T @ x_rows)
        return grad @ low, None, None


def row_gradient_head(model: Transformer) -> Callable[[Tensor], Tensor]:
    """A Transformer.head that takes HeadRows where a plain head weight needs a gradient (the original where
    plain_gradient_wanted). Under autocast the weight is cast once per change of it (an optimizer step), as
    autocast's own cache would within one block, and into the same buffer each time."""
    plain, copy = model.head, CastWeights()

    def head(x: Tensor) -> Tensor:
        weight = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        if plain_gradient_wanted(weight):
            return plain(x)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        if dtype == weight.dtype:
            return HeadRows.apply(x.to(dtype), weight, weight.detach())
        return HeadRows.apply(x.to(dtype), weight, copy([weight], dtype))
    return head


class LinearRows(torch.autograd.Function):
    """Linears that read the same input, as one matmul by `low`, their weights stacked by rows in x's dtype; the
    backward adds each weight's gradient straight into its .grad (float32 += bfloat16, in place).

    Under autocast the stock path runs one matmul per linear, and for each weight copies the bfloat16 gradient into
    a fresh float32 buffer in every pass before adding it to .grad. Here the stacked gradient comes from one matmul
    and its row blocks are added where they belong. The forward multiplies by `copy`, the CastWeights that made
    `low` (its packed kernel has no backward of its own). With no weights given (frozen ones) only x's gradient is
    made. The weights' own gradient edges get None."""

    @staticmethod
    def forward(ctx, x: Tensor, low: Tensor, copy: CastWeights, *weights: Tensor) -> Tensor:
        ctx.save_for_backward(x if weights else None, low)  # x only for the weights' gradient
        ctx.weights = weights
        return copy.linear(x, low)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, low = ctx.saved_tensors
        if ctx.weights:
            stacked = grad.flatten(0, -2).T @ x.flatten(0, -2)
            start = 0
            for weight in ctx.weights:
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                weight.grad.add_(stacked[start:start + weight.shape[0]])
                start += weight.shape[0]
        grad_x = grad @ low if ctx.needs_input_grad[0] else None
        return (grad_x, None, None) + (None,) * len(ctx.weights)


def cast_projection(plain: Callable[[Tensor], Any], linears: Sequence[nn.Linear],
                    split: Callable[[Tensor], Any]) -> Callable[[Tensor], Any]:
    """A forward (or project) method that, under autocast, runs `linears` as one matmul by their CastWeights and
    splits the output into theirs: LinearRows where every weight needs a gradient, LinearRows without weights where
    none does (frozen, or no grad mode: only the input's gradient, if any). `plain` where some do and some do not,
    where a gradient hook must see the whole gradient, outside autocast, with a bias or a sharded weight, and while a
    forward hook waits."""
    copy = CastWeights(packed=True)

    def project(x: Tensor) -> Any:
        weights = [m.weight for m in linears]
        if (not torch.is_autocast_enabled(x.device.type) or hooked(linears) or any(m.bias is not None for m in linears)
                or any(isinstance(w, DTensor) for w in weights)):
            return plain(x)
        dtype = torch.get_autocast_dtype(x.device.type)
        needs = [torch.is_grad_enabled() and w.requires_grad for w in weights]
        if not any(needs):  # frozen: the input's gradient alone, where the layers below need one
            return split(LinearRows.apply(x.to(dtype), copy(weights, dtype), copy))
        if all(needs) and not any(w._backward_hooks for w in weights):
            return split(LinearRows.apply(x.to(dtype), copy(weights, dtype), copy, *weights))
        return plain(x)
    return project


def cast_methods(model: Transformer) -> list[tuple[nn.Module, str, Callable]]:
    """(module, method name, replacement) for training's linears: each layer's q/k/v and gate/up stacked, every
    other linear of the layers on its own (the head has row_gradient_head)."""
    swaps: list[tuple[nn.Module, str, Callable]] = []
    alone = lambda y: y  # noqa: E731
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        singles = [attn.o_proj, mlp.down_proj]
        if attn.cfg.fused_qkv:
            singles.append(attn.qkv_proj)
        else:
            linears = [attn.q_proj, attn.k_proj, attn.v_proj]
            split = (lambda y, sizes=attn.sizes: y.split(sizes, dim=-1))
            swaps.append((attn, "project", cast_projection(attn.project, linears, split)))
        if mlp.fused:
            singles.append(mlp.gate_up_proj)
        else:
            swaps.append((mlp, "project", cast_projection(mlp.project, [mlp.gate_proj, mlp.up_proj],
                                                          lambda y: y.chunk(2, dim=-1))))
        swaps += [(m, "forward", cast_projection(m.forward, [m], alone)) for m in singles]
    return swaps


@contextmanager
def fast_training(model: Transformer) -> Iterator[None]:
    """Inside this block training steps take matmul attention where short_enough_to_train, the linears' weights in
    bfloat16 copies kept between steps with their gradients added straight into .grad (CastWeights, LinearRows), and
    the embedding's and the head's gradients likewise (EmbeddingRows, HeadRows); on exit, the model's own methods."""
    if model.model.embed_tokens.weight.device.type != "cpu":
        yield
        return
    swaps: list[tuple[nn.Module, str, Callable]] = [
        (block.self_attn, "attend", matmul_attend(block.self_attn, short_enough_to_train)) for block in model.layers]
    swaps += cast_methods(model)
    swaps.append((model.model.embed_tokens, "forward", row_gradient_embedding(model.model.embed_tokens)))
    swaps.append((model, "head", row_gradient_head(model)))
    with swapped(swaps):
        yield
