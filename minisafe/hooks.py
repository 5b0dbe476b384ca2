"""Acting on a model from outside: read per-layer vectors, scale a layer range's weights. Both are context managers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from minisafe.freeze import check_layer_range

# The projections the Safety Layers paper scales (Phi-3's fused matrices stand for their parts).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")


@contextlib.contextmanager
def record_layers(model: nn.Module, layers: Sequence[int] | None = None,
                  positions: int | Sequence[int] = -1) -> Iterator[dict[int, list[Tensor]]]:
    """Record the output of decoder layers (all by default) at the given token positions, for every forward pass.

    Yields {layer: [tensor per forward pass]}; each tensor is [B, D] for one position or [B, P, D] for several,
    float32 on the CPU. Position -1 is the last prompt token of a left-padded batch.
    """
    layers = range(model.config.num_layers) if layers is None else list(layers)
    index = torch.tensor(positions)
    records: dict[int, list[Tensor]] = {layer: [] for layer in layers}

    def hook_for(layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            records[layer].append(output[:, index].detach().float().cpu())
        return hook

    handles = [model.layers[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def scaled_parameters(model: nn.Module, first: int, last: int, scale_o_proj: bool = True) -> list[tuple[str, nn.Parameter]]:
    """The projection weights that scaled_layers multiplies: attention and MLP matrices of layers first..last."""
    check_layer_range(model.config.num_layers, first, last)
    names = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    if not scale_o_proj:
        names = tuple(n for n in names if n != "o_proj")
    chosen = []
    for layer in range(first, last + 1):
        prefix = f"model.layers.{layer}."
        for name, param in model.layers[layer].named_parameters():
            module = name.split(".")[-2]
            if name.endswith(".weight") and module in names:
                chosen.append((prefix + name, param))
    return chosen


@contextlib.contextmanager
def scaled_layers(model: nn.Module, first: int, last: int, alpha: float, scale_o_proj: bool = True) -> Iterator[list[str]]:
    """Multiply the attention and MLP projection weights of layers first..last by alpha; restore them on exit.

    scale_o_proj=False reproduces the paper-era script, whose o_proj scaling never reached the evaluated model.
    The originals are kept as copies, so the weights come back bit for bit, also when an exception escapes.
    Yields the names of the scaled tensors.
    """
    chosen = scaled_parameters(model, first, last, scale_o_proj)
    originals = [param.detach().clone() for _, param in chosen]
    try:
        with torch.no_grad():
            for _, param in chosen:
                param.mul_(alpha)
        yield [name for name, _ in chosen]
    finally:
        with torch.no_grad():
            for (_, param), original in zip(chosen, originals):
                param.copy_(original)
