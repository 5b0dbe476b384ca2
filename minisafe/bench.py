"""Speed of minisafe against transformers on the same checkpoint, in the same run (a benchmark, not a test).

    python -m minisafe.bench --model weights/smollm2-135m-instruct [--only prefill,generate,eval,train,sppft]

Reports tokens/s for each side, the ratio, and the share of this machine's matmul peak reached by the prefill.
transformers is imported here only as the yardstick; nothing in the library depends on it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable

import torch

import minisafe
from minisafe.generate import generate_ids
from minisafe.io import atomic_write_json

PARTS = ("prefill", "generate", "eval", "train", "sppft")


def best_time(fn: Callable[[], object], repeat: int = 3, warmup: bool = True) -> float:
    """Fastest of `repeat` runs (after one warm-up run unless warmup=False), in seconds."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of one n x n matmul, the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, repeat=5) / 1e9


def forward_flops(model: minisafe.model.Transformer, batch: int, length: int) -> float:
    """Matmul FLOPs of one causal forward pass: every projection and the head, plus attention's two products."""
    cfg = model.config
    linear = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    head = cfg.vocab_size * cfg.hidden_size
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * (length + 1) / 2
    return batch * (2 * length * (linear + (head if model.lm_head is None else 0)) + attention)


def random_batch(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(100, vocab - 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_transformers(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@torch.inference_mode()
def bench_prefill(ours, theirs, batch: int = 32, length: int = 64) -> dict:
    ids = random_batch(ours.config.vocab_size, batch, length)
    t_ours = best_time(lambda: ours(ids))
    t_theirs = best_time(lambda: theirs(input_ids=ids).logits)
    flops = forward_flops(ours, batch, length)
    return {"batch": batch, "length": length, "minisafe_tok_s": batch * length / t_ours,
            "transformers_tok_s": batch * length / t_theirs, "ratio": t_theirs / t_ours,
            "minisafe_gflop_s": flops / t_ours / 1e9, "transformers_gflop_s": flops / t_theirs / 1e9}


@torch.inference_mode()
def bench_generate(ours, theirs, tok, batch: int = 32, new: int = 32, prompts: list[str] | None = None,
                   repeat: int = 2, warmup: bool = True) -> dict:
    """Greedy generation of `new` tokens per prompt, EOS ignored so both sides make the same number of tokens."""
    if prompts is None:
        ids, mask = random_batch(ours.config.vocab_size, batch, 64), torch.ones(batch, 64, dtype=torch.long)
    else:
        ids, mask = tok.pad_left([tok.prompt_ids(p, "chat") for p in prompts[:batch]])
    t_ours = best_time(lambda: generate_ids(ours, ids, mask, new, eos_ids=[], pad_id=tok.pad_token_id), repeat, warmup)
    t_theirs = best_time(lambda: theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                                 min_new_tokens=new, do_sample=False,
                                                 pad_token_id=tok.pad_token_id), repeat, warmup)
    made = ids.shape[0] * new
    return {"batch": ids.shape[0], "new_tokens": new, "prompt_width": ids.shape[1],
            "minisafe_tok_s": made / t_ours, "transformers_tok_s": made / t_theirs, "ratio": t_theirs / t_ours}


def bench_train(ours, theirs, batch: int = 4, length: int = 128, steps: int = 3) -> dict:
    """Training tokens/s: forward, cross-entropy, backward, AdamW step; same batch, both in float32."""
    ids = random_batch(ours.config.vocab_size, batch, length)

    def step_fn(model, logits_of):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            logits = logits_of(model)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ours.train(), theirs.train()
    t_ours = best_time(step_fn(ours, lambda m: m(ids)), repeat=steps)
    t_theirs = best_time(step_fn(theirs, lambda m: m(input_ids=ids).logits), repeat=steps)
    ours.eval(), theirs.eval()
    return {"batch": batch, "length": length, "minisafe_tok_s": batch * length / t_ours,
            "transformers_tok_s": batch * length / t_theirs, "ratio": t_theirs / t_ours}


def _freeze_step(path: str, freeze: str | None, threads: int, batch: int, length: int, steps: int) -> dict:
    """One configuration of bench_sppft, run in a fresh process: step time, peak RSS, optimizer-state bytes."""
    from minisafe.freeze import FreezeSpec, apply_freeze, parse_layer_range

    torch.set_num_threads(threads)
    model, _ = minisafe.load(path)
    model.train()
    apply_freeze(model, FreezeSpec(layers=parse_layer_range(freeze) if freeze else None))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = random_batch(model.config.vocab_size, batch, length)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = best_time(step, repeat=steps)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"freeze": freeze or "none", "step_s": seconds, "tok_s": batch * length / seconds,
            "trainable_params": sum(p.numel() for p in params), "optimizer_state_bytes": state,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_sppft(path: str, freeze: str, threads: int, batch: int = 8, length: int = 128, steps: int = 3) -> dict:
    """Full fine-tuning against SPPFT (the layers of `freeze` frozen): bfloat16 autocast training steps, each
    configuration in its own process so that peak memory is its own."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        runs = [pool.apply(_freeze_step, (path, spec, threads, batch, length, steps)) for spec in (None, freeze)]
    full, sppft = runs
    return {"batch": batch, "length": length, "full": full, "sppft": sppft,
            "step_time_ratio": sppft["step_s"] / full["step_s"],
            "optimizer_state_ratio": sppft["optimizer_state_bytes"] / full["optimizer_state_bytes"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/smollm2-135m-instruct", help="Hugging Face model directory")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--freeze", default="11:17",
                   help="sppft part: the layers to freeze, FIRST:LAST (default: 7 of SmolLM2's 30, the paper's Llama-3 "
                        "share)")
    p.add_argument("--out", help="also write the numbers to this JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ours, tok = minisafe.load(a.model)
    theirs = load_transformers(a.model)
    results: dict = {"model": a.model, "threads": a.threads, "torch": torch.__version__,
                     "peak_gflop_s": {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}}
    parts = a.only.split(",")
    if "prefill" in parts:
        results["prefill"] = bench_prefill(ours, theirs)
        results["prefill"]["share_of_fp32_peak"] = results["prefill"]["minisafe_gflop_s"] / results["peak_gflop_s"]["float32"]
    if "generate" in parts:
        results["generate"] = bench_generate(ours, theirs, tok)
    if "eval" in parts:
        from minisafe.data import default_malicious_path, read_prompts

        prompts = read_prompts(default_malicious_path())[:200]
        # Minutes per run: timed once each, after the generate part has warmed both sides up.
        results["eval"] = bench_generate(ours, theirs, tok, batch=len(prompts), new=64, prompts=prompts, repeat=1,
                                         warmup=False)
    if "train" in parts:
        results["train"] = bench_train(ours, theirs)
    if "sppft" in parts:
        results["sppft"] = bench_sppft(a.model, a.freeze, a.threads)
    results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results, indent=2))
    if a.out:
        atomic_write_json(a.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
