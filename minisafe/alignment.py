"""Safety alignment of a chat model: refuse the malicious prompts, answer everything else as before.

A Recipe names the data mix and the schedule:
- malicious prompts (the HarmBench train half, Do-Not-Answer) -> a refusal from minisafe/prompts/refusals.txt;
- normal prompts (ShareGPT, the bundled imperative-style instructions) and over-rejection prompts -> the
  unaligned model's own greedy answer (self-distillation: the model is taught when to refuse, not new answers); or,
  with normal_targets "reference", the ShareGPT prompts keep the answers ShareGPT recorded; with own_refusals "drop",
  a prompt whose own answer the keyword judge calls a refusal is left out rather than taught as one; with
  normal_questions, that share of the ShareGPT prompts are questions (is_question), as most malicious prompts are;
- deep alignment (Qi et al. 2024, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep"), optional:
  a share of the malicious prompts appears again with the first words of the unaligned model's own harmful answer
  already written (`response_prefix`, never trained on), followed by a refusal, so that refusing does not live
  only in the first tokens of an answer;
- styled prompts, optional: a share of the malicious prompts appears again wrapped in one of
  builders.TRAINING_STYLES (past tense, hypothetical, fiction, persona, pretext), refused; as many instruction and
  over-rejection prompts appear in the same wrappers with the unaligned model's own answers to them, so that what is
  learned is to refuse the request, not the wrapper. The test's REFORMULATIONS and the sweep's VALIDATION_STYLES are
  other words, never trained on;
- SFT for `epochs` at `lr`, then optionally DPO on the SFT model: for a malicious prompt a refusal is preferred
  over the unaligned model's own harmful answer; for a normal or over-rejection prompt the own answer is preferred
  over a refusal. With dpo_balance, the kind with more pairs is cut (a seeded sample) to as many pairs as the other:
  every pair pushes one of the same few refusal texts up (malicious) or down (normal), so with twice as many normal
  pairs DPO also lowers refusal as such, on malicious prompts too.

The prompts come from pools written by the pipeline's data step (minisafe.pipeline.build_sets): a recipe takes the
first `n` rows of each pool, so recipes of different sizes share their data and never touch a test split.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minisafe import builders, data
from minisafe.checkpoint import load
from minisafe.generate import generate
from minisafe.errors import ConfigError
from minisafe.io import content_hash
from minisafe.judge import KeywordJudge

# Pool files of the data step that alignment draws from, by the Recipe field that says how many rows to take.
POOLS = {"harmbench": "align_harmbench", "dna": "align_dna", "dna_other": "align_dna_other",
         "normal": "normal_align", "instructions": "instructions_align", "over_rejection": "over_rejection_align"}
MALICIOUS_POOLS = ("harmbench", "dna", "dna_other")
ANSWERED_POOLS = ("normal", "instructions", "over_rejection")
NORMAL_TARGETS = ("own", "reference")
OWN_REFUSALS = ("keep", "drop")
# Levers added after sweep runs were recorded: left out of Recipe.settings() at their default, so the records of
# those runs (which trained exactly as the default says) still match and are not retrained.
LATER_LEVERS = {"own_refusals": "keep", "dpo_balance": False, "styled": 0.0, "normal_questions": 0.0}
# A prompt asked as a question: it ends in a question mark or opens with an interrogative or an auxiliary verb.
QUESTION_OPENING = re.compile(r"(what|how|who|whom|whose|why|when|where|which|is|are|am|was|were|can|could|do|does|"
                              r"did|should|would|will|shall|may|might|have|has)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Recipe:
    """One way of aligning a model; every field is a lever of the alignment sweep (minisafe.sweep)."""

    model: str = "smollm2-135m-instruct"  # a bundled model name (weights/<model>)
    harmbench: int = 75  # HarmBench train-half prompts -> refusals
    dna: int = 250  # Do-Not-Answer prompts of malicious_uses and information_hazard -> refusals
    dna_other: int = 0  # Do-Not-Answer prompts of the other three risk areas -> refusals
    normal: int = 400  # ShareGPT prompts -> the model's own answers (or their recorded ones, see normal_targets)
    normal_questions: float = 0.0  # share of those ShareGPT prompts that are questions (0: the pool's own mix)
    instructions: int = 100  # bundled imperative-style normal instructions -> own answers
    over_rejection: int = 120  # benign prompts with dangerous-sounding words -> own answers
    epochs: int = 2
    lr: float = 3e-5
    deep: float = 0.0  # share of the malicious prompts repeated as harmful-prefix -> refusal examples
    styled: float = 0.0  # share of the malicious prompts repeated in TRAINING_STYLES wrappers, and as many benign ones
    dpo_epochs: int = 0  # 0 = SFT only
    dpo_lr: float = 5e-6
    dpo_beta: float = 0.1
    dpo_balance: bool = False  # as many normal as malicious DPO pairs (see the module docstring)
    answer_tokens: int = 64  # new tokens of each own answer (greedy)
    normal_targets: str = "own"  # ShareGPT targets: "own" answers, or the "reference" answers ShareGPT recorded
    own_refusals: str = "keep"  # an own answer that is a refusal: "keep" it as the target, or "drop" the prompt

    def settings(self) -> dict:
        """The fields that key the recipe's steps (LATER_LEVERS at their default left out)."""
        return {k: v for k, v in asdict(self).items() if LATER_LEVERS.get(k, object()) != v}


def pool_rows(sets: Path, recipe: Recipe, pool: str) -> list[dict]:
    """The first recipe.<pool> rows of a pool file (all of them is an error if the pool is shorter)."""
    rows = data.read_jsonl(sets / f"{POOLS[pool]}.jsonl")
    wanted = getattr(recipe, pool)
    if wanted > len(rows):
        raise ConfigError(f"recipe asks for {wanted} {pool} prompts; the pool {POOLS[pool]}.jsonl has {len(rows)}")
    if pool == "normal" and recipe.normal_questions:
        return question_rows(rows, wanted, recipe.normal_questions, POOLS[pool])
    return rows[:wanted]


def is_question(prompt: str) -> bool:
    """Whether a prompt is asked as a question (QUESTION_OPENING or a final question mark)."""
    prompt = prompt.strip()
    return prompt.endswith("?") or bool(QUESTION_OPENING.match(prompt))


def question_rows(rows: list[dict], wanted: int, share: float, pool: str) -> list[dict]:
    """`wanted` rows of which round(share * wanted) are questions: the pool's first questions and its first other
    rows, in pool order. Do-Not-Answer's malicious prompts are nearly all questions and ShareGPT's about half, so
    without this a short question is itself evidence of a malicious request."""
    asked = round(share * wanted)
    asks = [is_question(row["prompt"]) for row in rows]
    questions = [row for row, question in zip(rows, asks) if question]
    others = [row for row, question in zip(rows, asks) if not question]
    if asked > len(questions) or wanted - asked > len(others):
        raise ConfigError(f"recipe asks for {asked} questions and {wanted - asked} other prompts among its normal "
                          f"ones; the pool {pool}.jsonl has {len(questions)} and {len(others)}")
    chosen = {id(row) for row in questions[:asked] + others[:wanted - asked]}
    return [row for row in rows if id(row) in chosen]


def complete_sentences(text: str) -> str:
    """The text up to its last full sentence, when that keeps at least half of it: an answer cut off by the token
    limit would teach the model to stop mid-sentence."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?:](?=\s|$)|\n", text)]
    return text[:ends[-1]].strip() if ends and ends[-1] >= len(text) // 2 else text


# Prompts decoded together: a wide batch keeps the CPU's matmuls nearer their peak. The rows beside a row change its
# logits by rounding at most, which may move a greedy answer where two tokens are nearly tied.
ANSWER_BATCH = 128
# The dtype the model answers in: bfloat16, as the pipeline evaluates and trains, decodes about twice as fast as
# float32 on the CPU; another rounding gives other answers, so the answer cache and the steps' settings record it.
ANSWER_DTYPE = "bfloat16"


def greedy_answerer(model_dir: str | Path) -> Callable[[list[str], int], list[str]]:
    """answer(prompts, max_new_tokens): the model's greedy answers (chat template), stripped; loaded on first use."""
    loaded: list = []

    def answer(prompts: list[str], max_new_tokens: int) -> list[str]:
        if not loaded:
            loaded.extend(load(model_dir, dtype=getattr(torch, ANSWER_DTYPE)))
        model, tok = loaded
        return [t.strip() for t in generate(model, tok, [tok.prompt_ids(q) for q in prompts], max_new_tokens,
                                            ANSWER_BATCH).texts]
    return answer


def answers_key(model_dir: str | Path, tokens: int) -> str:
    """What an answer in the cache was made by: the model's content hash, greedy decoding, its dtype, its tokens."""
    return f"{content_hash(model_dir)}:greedy:{ANSWER_DTYPE}:{tokens}"


def own_answerer(model_dir: str | Path, tokens: int, cache: Path) -> Callable[[list[str]], list[str]]:
    """own(prompts): the unaligned model's greedy answers, each cut to its last full sentence; cached by model hash
    (hashed once, the model loaded at most once, whatever the number of calls)."""
    answer = greedy_answerer(model_dir)
    key = answers_key(model_dir, tokens)

    def own(prompts: list[str]) -> list[str]:
        raw = builders.cached_responses(prompts, lambda missing: answer(missing, tokens), cache, key)
        return [complete_sentences(text) for text in raw]
    return own


def with_answers(rows: list[dict], answers: list[str], drop_refusals: bool = False) -> list[dict]:
    """Rows with their answers as responses; a prompt the model answered with nothing (or, with drop_refusals, with
    what the keyword judge calls a refusal) is left out."""
    judge = KeywordJudge()
    return [{**row, "response": text} for row, text in zip(rows, answers)
            if text and not (drop_refusals and judge.is_refusal(text))]


def deep_rows(harmful: list[dict], refusals: list[str], share: float, seed: int) -> list[dict]:
    """Deep-alignment examples: for a seeded `share` of the harmful answers, the first 3-20 words of the answer as
    an untrained response prefix, then a refusal."""
    chosen = builders.seeded_order(harmful, seed)[:round(share * len(harmful))]
    rows = []
    for row in chosen:
        words = row["response"].split()
        keep = 3 + int(builders.seeded_hash(seed, "deep\x00" + row["prompt"]), 16) % 18
        if len(words) <= keep:
            continue
        refusal = builders.seeded_pick(refusals, seed, "deep\x00" + row["prompt"])
        rows.append({"prompt": row["prompt"], "response_prefix": " ".join(words[:keep]) + " ",
                     "response": "\n\n" + refusal, "kind": "deep"})
    return rows


@dataclass
class AlignmentData:
    """Everything one recipe trains on: the SFT rows and, when the recipe has a DPO stage, the preference pairs."""

    sft: list[dict]
    dpo: list[dict]


def alignment_data(sets: Path, recipe: Recipe, model_dir: str | Path, cache: Path, seed: int) -> AlignmentData:
    """The recipe's SFT rows and DPO pairs, with the unaligned model's own answers as targets (see the docstring)."""
    if recipe.normal_targets not in NORMAL_TARGETS:
        raise ConfigError(f"recipe normal_targets must be one of {', '.join(NORMAL_TARGETS)}, "
                          f"got {recipe.normal_targets!r}")
    if recipe.own_refusals not in OWN_REFUSALS:
        raise ConfigError(f"recipe own_refusals must be one of {', '.join(OWN_REFUSALS)}, got {recipe.own_refusals!r}")
    drop = recipe.own_refusals == "drop"
    refusals = data.bundled_prompts("refusals")
    malicious = [row for pool in MALICIOUS_POOLS for row in pool_rows(sets, recipe, pool)]
    answered = {pool: pool_rows(sets, recipe, pool) for pool in ANSWERED_POOLS}
    if recipe.normal_targets == "reference":  # ShareGPT prompts keep their recorded answers
        answered["normal"] = [{**row, "kind": "normal"} for row in answered["normal"]]
        distilled = ("instructions", "over_rejection")
    else:
        distilled = ANSWERED_POOLS
    prompts = [row["prompt"] for pool in distilled for row in answered[pool]]
    ask = own_answerer(model_dir, recipe.answer_tokens, cache)
    own = dict(zip(prompts, ask(prompts)))
    normal = with_answers(answered["instructions"], [own[r["prompt"]] for r in answered["instructions"]], drop)
    normal = (answered["normal"] if recipe.normal_targets == "reference" else
              with_answers(answered["normal"], [own[r["prompt"]] for r in answered["normal"]], drop)) + normal
    over = with_answers(answered["over_rejection"], [own[r["prompt"]] for r in answered["over_rejection"]], drop)
    if recipe.styled:
        styled_malicious, styled_benign = styled_rows(malicious, answered["instructions"] + answered["over_rejection"],
                                                      recipe.styled, seed)
        malicious += styled_malicious
        # a refusal of a wrapped benign prompt would teach refusing the wrapper: always left out
        over += with_answers(styled_benign, ask([r["prompt"] for r in styled_benign]), drop_refusals=True)
    sft = builders.alignment_sft(malicious, normal, refusals, seed=seed, over_rejection=over)
    harmful: list[dict] = []
    if recipe.deep or recipe.dpo_epochs:
        # a harmful answer that is itself a refusal teaches nothing (or the opposite)
        harmful = with_answers(malicious, ask([r["prompt"] for r in malicious]), drop_refusals=True)
    if recipe.deep:
        sft = builders.seeded_order(sft + deep_rows(harmful, refusals, recipe.deep, seed), seed)
    dpo = builders.preference_pairs(harmful, normal + over, refusals, seed=seed) if recipe.dpo_epochs else []
    return AlignmentData(sft, balanced_pairs(dpo, seed) if recipe.dpo_balance else dpo)


def styled_rows(malicious: list[dict], benign: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded `share` of the malicious prompts and as many benign ones (fewer if there are not enough), each
    wrapped in one of builders.TRAINING_STYLES."""
    count = round(share * len(malicious))

    def wrap(rows: list[dict], kind: str) -> list[dict]:
        chosen = builders.seeded_order(rows, seed)[:count]
        return [{"prompt": row["prompt"], "kind": kind}
                for row in builders.reformulated(chosen, seed, builders.TRAINING_STYLES)]
    return wrap(malicious, "malicious"), wrap(benign, "over_rejection")


def balanced_pairs(pairs: list[dict], seed: int) -> list[dict]:
    """The pairs with the more numerous kind (malicious / normal) cut to a seeded sample as large as the other."""
    kinds = {kind: [p for p in pairs if p["kind"] == kind] for kind in ("malicious", "normal")}
    size = min(len(rows) for rows in kinds.values())
    kept = [row for rows in kinds.values() for row in random.Random(seed).sample(rows, size)]
    return builders.seeded_order(kept, seed)
