"""Load and save Hugging Face model directories of safetensors (single file or sharded), strictly by name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minisafe.config import ModelConfig, as_id_list, load_config
from minisafe.errors import CheckpointError
from minisafe.io import atomic_directory, read_json
from minisafe.model import Transformer
from minisafe.tokenizer import Tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = ("float32", "bfloat16")  # the dtypes the scripts offer, by name
# Tensors some checkpoints carry that are not parameters: old rotary buffers, recomputed from the config.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# A Gemma 3 multimodal checkpoint keeps the language model under a prefix; minisafe loads only that part.
MULTIMODAL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                       "language_model.lm_head.": "lm_head."}


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         allow_non_finite: bool = False) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from a Hugging Face directory (config.json, *.safetensors, tokenizer.json).

    A weight that is NaN or infinite is an error naming the tensors; allow_non_finite=True loads such a model anyway
    (to inspect a diverged run, say) with a warning instead.
    """
    path = Path(path)
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"dtype {dtype} cannot run the model; use one of {', '.join(map(str, FLOAT_DTYPES))}")
    problem = model_file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory (expected config.json, model.safetensors, tokenizer.json)")
    cfg = load_config(path)
    model = load_model(path, cfg, dtype, device, allow_non_finite)
    generation = read_json(path / "generation_config.json", CheckpointError) or {}
    extra_eos = cfg.eos_token_id + as_id_list(generation.get("eos_token_id"))
    return model, Tokenizer.from_dir(path, extra_eos_ids=extra_eos, context=cfg.max_position_embeddings)


def model_file_problem(path: str | Path) -> str | None:
    """What is wrong, in words, when a model path names a file (a pickle, or a file of a model directory); else None."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix in PICKLE_SUFFIXES:
        return _pickle_message(path).removeprefix(f"{path}: ")
    return (f"a file, not a model directory; pass the directory that holds config.json, the *.safetensors "
            f"weights and tokenizer.json (perhaps {path.parent})")


def load_model(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device,
               allow_non_finite: bool = False) -> Transformer:
    """Build the model without initialising it, then fill every parameter from the checkpoint (strict)."""
    tensors = read_state_dict(path, dtype, allow_non_finite)
    if cfg.hf.get("model_type") == "gemma3":
        tensors = _text_part(tensors)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway; it is the embedding
    for name in [n for n in tensors if n.endswith(IGNORED_SUFFIXES)]:
        del tensors[name]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match a {cfg.model_type} model with this config.json: "
                              f"missing {_names(missing)}; unexpected {_names(unexpected)}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config.json implies {tuple(shape)}")
    model.load_state_dict({n: t.to(device) for n, t in tensors.items()}, strict=True, assign=True)
    return model.eval()


def read_state_dict(path: Path, dtype: torch.dtype, allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint, cast to dtype; NaN or inf weights are refused
    (or, with allow_non_finite, warned about)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        found = read_weights_file(file, dtype)
        _check_finite(file, found, allow_non_finite)
        tensors.update(found)
    return tensors


def read_weights_file(file: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, cast to dtype; integer (quantized) tensors are refused."""
    tensors = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.dtype not in FLOAT_DTYPES + (torch.float64,):
                    raise CheckpointError(f"{file}: tensor {name} is {tensor.dtype}; minisafe loads floating-point "
                                          "weights only (dequantize first)")
                tensors[name] = tensor.to(dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors


def _check_finite(file: Path, tensors: dict[str, torch.Tensor], allow_non_finite: bool) -> None:
    """Refuse (or warn about) the tensors of one weights file that hold NaN or inf, checked after the dtype cast,
    which can itself overflow to inf."""
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if not bad:
        return
    message = (f"{file}: non-finite weights (NaN or inf) in tensor {_names(bad)}; a model with them gives "
               "meaningless outputs")
    if not allow_non_finite:
        raise CheckpointError(message + " (load with allow_non_finite=True to inspect it anyway)")
    warnings.warn(message)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; pickle checkpoints are refused."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        contents = read_json(index, CheckpointError)
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' naming the shard of each tensor")
        files = list(dict.fromkeys(_shard_path(index, tensor, shard) for tensor, shard in weight_map.items()))
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{index}: lists shard {file.name}, which is missing from {path}")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(_pickle_message(pickles[0]))
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _shard_path(index: Path, tensor: str, shard: object) -> Path:
    """The file of one weight_map entry, which must lie inside the model directory: an index that points elsewhere
    (../x, /abs/x, a symlink out) would load weights that the directory, and every hash of it, does not hold."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: weight_map entry {tensor!r} must name a shard file, got {shard!r}")
    name = Path(shard)
    target = (index.parent / name).resolve()
    if name.is_absolute() or ".." in name.parts or not any(target.is_relative_to(d) for d in _shard_homes(index)):
        raise CheckpointError(f"{index}: weight_map entry {tensor!r} -> {shard!r} resolves to {target}, outside the "
                              f"model directory {index.parent}; shards must be files inside it")
    return index.parent / name


def _shard_homes(index: Path) -> list[Path]:
    """Where a shard may really live: the model directory, and for a snapshot in the Hugging Face hub cache (whose
    files are symlinks to ../../blobs) that repository's blobs folder."""
    folder = index.parent.resolve()
    homes = [folder]
    if folder.parent.name == "snapshots":
        homes.append(folder.parent.parent / "blobs")
    return homes


def save(model: Transformer, tokenizer: Tokenizer, path: str | Path) -> None:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer files), atomically."""
    cfg = model.config
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    dtype = next(iter(state.values())).dtype
    hf_config = {**cfg.hf, "torch_dtype": str(dtype).removeprefix("torch."),
                 "tie_word_embeddings": cfg.tie_word_embeddings}
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer.save(tmp)
        generation = {"eos_token_id": tokenizer.eos_token_ids, "pad_token_id": tokenizer.pad_token_id}
        if cfg.bos_token_id is not None:
            generation["bos_token_id"] = cfg.bos_token_id
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _text_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the language model of a multimodal Gemma 3 checkpoint, renamed to the text model's names."""
    out = {}
    for name, tensor in tensors.items():
        for prefix, new in MULTIMODAL_PREFIXES.items():
            if name.startswith(prefix):
                out[new + name[len(prefix):]] = tensor
    return out


def _pickle_message(file: Path) -> str:
    return (f"{file}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused, because loading one runs "
            "arbitrary code. Convert it once to safetensors (for example with transformers: "
            "model.save_pretrained(dir, safe_serialization=True)) and point minisafe at that directory.")


def _names(names: list[str], shown: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

