"""Speed of minisafe against transformers on the same checkpoint, in the same run (a benchmark, not a test).

    python -m tools.bench --model weights/smollm2-135m-instruct [--only prefill,generate,eval,profile,train,sppft]

Prefill, generation and the eval workload run once per --dtypes entry, both sides in that dtype, and so does a profile
of minisafe's decoding steps (where a step's time goes); training and SPPFT run at the pipeline's settings (bfloat16
autocast, its batches: see tools/bench_train.py).
Reports tokens/s for each side, the ratio, and the share of this machine's matmul peak (for the same dtype) reached
by the prefill. The JSON written with --out also records the command, the machine and the versions;
`python -m minisafe.report bench runs/bench --out docs/bench.md` turns such files into docs/bench.md.
transformers is imported here only as the yardstick; nothing in the library depends on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

import minisafe
from minisafe import data
from minisafe.fastpath import fast_inference
from minisafe.generate import generate, generate_ids, greedy, similar_length_batches
from minisafe.io import atomic_write_json, machine
from tools import bench_train, fetch_data, weights

PARTS = ("prefill", "generate", "eval", "profile", "train", "sppft")
DTYPE_PARTS = ("prefill", "generate", "eval", "profile")
PROJECTION_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")  # packed, or F.linear's fallbacks


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Fastest of `repeat` runs after one warm-up run, in seconds."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_times(a: Callable[[], object], b: Callable[[], object], repeat: int = 3, warm_up: bool = True
               ) -> tuple[float, float]:
    """Fastest of `repeat` runs of each of two rivals, run in turn (a, b, a, b, ...) after one warm-up run each (unless
    the caller warmed them up), so that a slow spell of the machine falls on both sides alike."""
    seconds = bench_train.alternate({"a": lambda _: a(), "b": lambda _: b()}, [None] * (repeat + warm_up),
                                    warm_up=int(warm_up))
    return min(seconds["a"]), min(seconds["b"])


def peak_rss_mb() -> float:
    """This process's peak resident memory. Read from /proc: ru_maxrss survives exec, so a spawned child would
    report its parent's peak if that was higher."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of one n x n matmul through torch.matmul (MKL in float32) and through oneDNN with the weight prepacked
    (fast_inference's path); the faster is the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(b)
    seconds = {"matmul": best_time(lambda: a @ b, repeat=5),
               "onednn_packed": best_time(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""),
                                          repeat=5)}
    rates = {kernel: 2 * n**3 / s / 1e9 for kernel, s in seconds.items()}
    return {**rates, "peak": max(rates.values())}


def projection_params(model: minisafe.model.Transformer) -> int:
    """Weights multiplied once per token: every projection matrix and the head (the embedding, when tied)."""
    linear = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    tied_head = model.config.vocab_size * model.config.hidden_size if model.lm_head is None else 0
    return linear + tied_head


def forward_flops(model: minisafe.model.Transformer, batch: int, length: int) -> float:
    """Matmul FLOPs of one causal forward pass: every projection and the head, plus attention's two products."""
    cfg = model.config
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * (length + 1) / 2
    return batch * (2 * length * projection_params(model) + attention)


def random_batch(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(100, vocab - 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_transformers(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


@torch.inference_mode()
def bench_prefill(ours, theirs, batch: int = 32, length: int = 64) -> dict:
    """One forward pass over every position; both sides hand back float32 logits, as minisafe's forward does."""
    ids = random_batch(ours.config.vocab_size, batch, length)
    with fast_inference(ours):  # packing happens once, outside the timed passes
        t_ours, t_theirs = best_times(lambda: ours(ids), lambda: theirs(input_ids=ids).logits.float(), repeat=5)
    flops = forward_flops(ours, batch, length)
    return {"batch": batch, "length": length, "minisafe_tok_s": batch * length / t_ours,
            "transformers_tok_s": batch * length / t_theirs, "ratio": t_theirs / t_ours,
            "minisafe_gflop_s": flops / t_ours / 1e9, "transformers_gflop_s": flops / t_theirs / 1e9}


@torch.inference_mode()
def bench_generate(ours, theirs, tok, batch: int = 32, new: int = 32, length: int = 64, repeat: int = 3) -> dict:
    """Greedy generation of `new` tokens for random prompts, EOS ignored so both sides make the same number of tokens."""
    ids, mask = random_batch(ours.config.vocab_size, batch, length), torch.ones(batch, length, dtype=torch.long)
    t_ours, t_theirs = best_times(
        lambda: generate_ids(ours, ids, mask, new, eos_ids=[], pad_id=tok.pad_token_id),
        lambda: theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=tok.pad_token_id), repeat)
    made = batch * new
    return {"batch": batch, "new_tokens": new, "prompt_length": length,
            "minisafe_tok_s": made / t_ours, "transformers_tok_s": made / t_theirs, "ratio": t_theirs / t_ours}


@torch.inference_mode()
def bench_eval(ours, theirs, tok, prompts: list[str], new: int = 64, batch_size: int = 50) -> dict:
    """The eval workload: chat prompts answered greedily up to EOS or `new` tokens, in batches of similar length.

    minisafe runs its generate() as eval.py does; transformers' generate gets the same batches. After a small
    warm-up, each side runs the whole workload twice, in turn, and its faster run counts; tokens/s counts the tokens
    each side made, EOS included.
    """
    ids = [tok.prompt_ids(p, "chat") for p in prompts]
    answers: list[list[int]] = []
    theirs_answers: dict[int, list[int]] = {}

    def transformers_generate(rows: list[int]) -> list[list[int]]:
        x, mask = tok.pad_left([ids[i] for i in rows])
        out = theirs.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              eos_token_id=tok.eos_token_ids, pad_token_id=tok.pad_token_id)[:, x.shape[1]:]
        return [row[: next((i + 1 for i, t in enumerate(row) if t in tok.eos_token_ids), len(row))]
                for row in out.tolist()]

    def run_ours() -> None:
        answers[:] = generate(ours, tok, ids, new, batch_size, progress=False).ids

    def run_theirs() -> None:
        for rows in similar_length_batches(ids, batch_size):
            theirs_answers.update(zip(rows, transformers_generate(rows)))

    generate(ours, tok, ids[:2], 4, progress=False)
    transformers_generate([0, 1])
    t_ours, t_theirs = best_times(run_ours, run_theirs, repeat=2, warm_up=False)
    made_ours, made_theirs = sum(map(len, answers)), sum(map(len, theirs_answers.values()))
    same = sum(answers[i] == theirs_answers[i] for i in range(len(ids))) / len(ids)
    return {"prompts": len(ids), "new_tokens": new, "batch_size": batch_size, "minisafe_s": t_ours,
            "transformers_s": t_theirs, "minisafe_tokens": made_ours, "transformers_tokens": made_theirs,
            "minisafe_tok_s": made_ours / t_ours, "transformers_tok_s": made_theirs / t_theirs,
            "ratio": (made_ours / t_ours) / (made_theirs / t_theirs), "same_answers": same}


@torch.inference_mode()
def profile_decoding(ours, batch: int = 50, length: int = 48, warm: int = 16, steps: int = 8) -> dict:
    """Where a greedy decoding step of minisafe spends its time (torch.profiler, self time per operator): the packed
    projections and head, attention's matmuls over the KV cache, and everything else (top five named)."""
    from torch.profiler import profile

    cfg = ours.config
    ids, mask = random_batch(cfg.vocab_size, batch, length), torch.ones(batch, length, dtype=torch.long)
    slots = length + warm + 2 * steps
    with fast_inference(ours):
        cache = ours.new_cache(batch, slots)
        token = greedy(ours(ids, mask, cache=cache, last_logits_only=True, float_logits=False)[:, -1])

        def step() -> None:
            nonlocal mask, token
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            token = greedy(ours(token[:, None], mask, cache=cache, float_logits=False)[:, -1])

        for _ in range(warm):
            step()
        start = time.perf_counter()
        for _ in range(steps):  # timed without the profiler, whose own cost would count
            step()
        wall = (time.perf_counter() - start) / steps
        with profile() as prof:
            for _ in range(steps):
                step()
    self_ms = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    projections = sum(ms for op, ms in self_ms.items() if op in PROJECTION_OPS)
    attention = self_ms.get("aten::bmm", 0.0)
    rest = {op: ms for op, ms in self_ms.items() if op not in PROJECTION_OPS and op != "aten::bmm" and ms > 0}
    return {"batch": batch, "slots": slots, "step_ms": 1000 * wall, "profiled_ms": sum(self_ms.values()),
            "projections_ms": projections, "projections_gflop_s": 2 * batch * projection_params(ours) / projections / 1e6,
            "attention_matmuls_ms": attention, "rest_ms": sum(rest.values()),
            "rest_top": dict(sorted(rest.items(), key=lambda kv: -kv[1])[:5])}


def summarize(part: str, run: dict) -> None:
    """One line per finished part, so that a long run shows its numbers as they come."""
    peak = f", {run['share_of_peak']:.0%} of peak" if "share_of_peak" in run else ""
    print(f"{part}: minisafe {run['minisafe_tok_s']:.0f} tok/s, transformers {run['transformers_tok_s']:.0f} tok/s, "
          f"ratio {run['ratio']:.2f}x{peak}", flush=True)


def summarize_profile(dtype: str, prof: dict) -> None:
    """The decoding profile's line: where a step's time went."""
    top = ", ".join(f"{op.removeprefix('aten::')} {ms:.1f}" for op, ms in prof["rest_top"].items())
    print(f"{dtype} decoding step, batch {prof['batch']}, {prof['slots']} slots: {prof['step_ms']:.1f} ms; "
          f"projections {prof['projections_ms']:.1f} ms ({prof['projections_share_of_peak']:.0%} of peak), "
          f"attention matmuls {prof['attention_matmuls_ms']:.1f} ms, other operators {prof['rest_ms']:.1f} ms "
          f"({top}), outside operators (Python) {max(0.0, prof['step_ms'] - prof['profiled_ms']):.1f} ms", flush=True)


def record_header(module: str, argv: list[str] | None) -> dict:
    """What every benchmark file records first: the command that made it, when, and on which machine."""
    return {"command": ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)],
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}


def write_results(results: dict, out: str | None) -> None:
    """Every number into `out` (atomically), or printed as JSON without one."""
    if out:
        atomic_write_json(out, results)
        print(f"every number: {out}")
    else:
        print(json.dumps(results, indent=2))


def fetch_bundled(model: str, need_data: bool) -> None:
    """Fetch the model when it is a bundled one that is missing, and the datasets when the eval part needs them."""
    if model.startswith("weights/") and model.removeprefix("weights/") in weights.MODELS:
        weights.fetch(model.removeprefix("weights/"), "weights")
    if need_data:
        fetch_data.fetch("data")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with --only checked against the known parts."""
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/smollm2-135m-instruct", help="Hugging Face model directory")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="dtypes for the prefill, generate and eval parts, both sides loaded in each (default: both)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--eval-prompts", type=int, default=200, help="eval part: HarmBench test prompts (default: 200)")
    p.add_argument("--eval-batch", type=int, default=50, help="eval part: batch size (default: 50, the pipeline's)")
    p.add_argument("--freeze", default="11:19",
                   help="sppft part: the layers to freeze, FIRST:LAST (default: 9 of SmolLM2's 30, the paper's "
                        "Llama-2 share)")
    p.add_argument("--train-data", nargs="+", metavar="FILE",
                   help="train and sppft parts: sft data files, one workload each (default: attack and alignment "
                        "batches built from the fetched data, see tools/bench_train.py)")
    p.add_argument("--train-steps", type=int, default=8, help="train and sppft parts: timed steps per contender")
    p.add_argument("--out", help="also write the numbers to this JSON file")
    a = p.parse_args(argv)
    a.parts = a.only.split(",")
    if unknown := sorted(set(a.parts) - set(PARTS)):
        p.error(f"--only: unknown part(s) {', '.join(unknown)}; expected some of {','.join(PARTS)}")
    return a


def run_dtype_parts(a: argparse.Namespace, prompts: list[str], results: dict) -> None:
    """Prefill, generate, eval and profile for each of --dtypes, both sides loaded in that dtype."""
    parts = a.parts
    for name in a.dtypes.split(",") if any(part in parts for part in DTYPE_PARTS) else ():
        dtype = getattr(torch, name)
        ours, tok = minisafe.load(a.model, dtype=dtype)
        theirs = load_transformers(a.model, dtype)
        runs = results[name] = {}
        if "prefill" in parts:
            runs["prefill"] = bench_prefill(ours, theirs)
            peak = results["peak_gflop_s"][name]["peak"]
            runs["prefill"]["share_of_peak"] = runs["prefill"]["minisafe_gflop_s"] / peak
            summarize(f"{name} prefill", runs["prefill"])
        if "generate" in parts:
            runs["generate"] = bench_generate(ours, theirs, tok)
            summarize(f"{name} generate", runs["generate"])
        if "eval" in parts:
            runs["eval"] = bench_eval(ours, theirs, tok, prompts, batch_size=a.eval_batch)
            summarize(f"{name} eval", runs["eval"])
        if "profile" in parts:
            runs["profile"] = prof = profile_decoding(ours, batch=a.eval_batch)
            prof["projections_share_of_peak"] = prof["projections_gflop_s"] / results["peak_gflop_s"][name]["peak"]
            summarize_profile(name, prof)
        del ours, theirs


def run_train_parts(a: argparse.Namespace, results: dict) -> None:
    """Training at the pipeline's settings (three contenders, every workload) and SPPFT against full fine-tuning."""
    workloads = (bench_train.workloads_from_files(a.train_data) if a.train_data else
                 bench_train.default_workloads())
    peak = results["peak_gflop_s"]["bfloat16"]["peak"]
    if "train" in a.parts:
        theirs = load_transformers(a.model)
        results["train"] = {}
        for name, rows in workloads.items():
            run = results["train"][name] = bench_train.bench_train_workload(a.model, theirs, rows, a.train_steps, peak)
            print(f"training ({name}): minisafe {run['minisafe_tok_s']:.0f} tok/s, "
                  f"before {run['minisafe-before_tok_s']:.0f}"
                  f", transformers {run['transformers_tok_s']:.0f}; {run['ratio_vs_before']:.2f}x before, "
                  f"{run['ratio_vs_transformers']:.2f}x transformers, {run['share_of_bf16_peak']:.0%} of the bf16 peak",
                  flush=True)
    if "sppft" in a.parts:
        rows = next(iter(workloads.values()))
        run = results["sppft"] = {**bench_train.bench_sppft_steps(a.model, rows, a.freeze, a.train_steps),
                                  "memory": bench_train.bench_sppft_memory(a.model, rows, a.freeze, a.threads)}
        print(f"sppft {a.freeze} ({run['frozen_parameter_share']:.0%} of parameters frozen) against full: median step "
              f"time ratio {run['step_time_ratio']:.2f}, AdamW state {run['memory']['optimizer_state_ratio']:.2f}x, "
              f"peak RSS {run['memory']['peak_rss_ratio']:.2f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts, print each part's line as it ends, then every number (as JSON, or into --out)."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import transformers  # the yardstick, a test-only dependency: deferred so that --help works without it

    # Before any timing, so that a missing input fails early.
    fetch_bundled(a.model, need_data=bool({"eval", "train", "sppft"} & set(a.parts)))
    prompts = data.read_prompts(data.default_malicious_path())[: a.eval_prompts] if "eval" in a.parts else []
    results: dict = {**record_header("tools.bench", argv), "model": a.model, "threads": a.threads,
                     "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "peak_gflop_s": {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}}
    run_dtype_parts(a, prompts, results)
    if "train" in a.parts or "sppft" in a.parts:
        run_train_parts(a, results)
    results["max_rss_mb"] = peak_rss_mb()
    write_results(results, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
