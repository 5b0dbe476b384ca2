"""How the pipeline cuts its sources into sets: test splits first, then validation splits (the alignment sweep's),
then the pools that alignment and attacks draw from, so that nothing evaluated is ever trained on.

Sources: HarmBench (its test half is split_malicious's), Do-Not-Answer (the two plainly malicious risk areas apart
from the other three), ShareGPT pairs, the bundled over-rejection prompts and imperative-style normal instructions.
Each is taken in a seeded order, so the sizes in Splits alone decide which prompt lands where, and a larger pool only
adds rows. build_sets writes every set as JSONL with a manifest (builders.write_dataset) after check_disjoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from minisafe import builders, data
from minisafe.errors import DataError


@dataclass(frozen=True)
class Splits:
    """How every source is cut, the same in every profile and in the alignment sweep: test splits first, then
    validation, then the pools that training draws from. Each source is in a seeded order, so these sizes alone
    decide which prompt lands where."""

    harmbench_val: int = 25  # carved from the HarmBench train half (the test half is split_malicious's)
    dna_test: int = 100  # Do-Not-Answer malicious_uses + information_hazard
    dna_val: int = 50
    dna_other_test: int = 40  # per other risk area
    dna_other_val: int = 15  # per other risk area
    sharegpt_test: int = 100  # the utility set: normal prompts refused, ROUGE-L, perplexity
    sharegpt_val: int = 50
    attack_pool: int = 400  # ShareGPT pairs that attack sets are built from
    instructions_val: int = 44
    instructions_align: int = 100  # the rest of the bundled instructions are the cosine analysis's normal prompts
    over_test: int = 200
    over_locate: int = 128
    over_val: int = 60


SPLITS = Splits()



DNA_AREAS = ("malicious_uses", "information_hazard")  # the two areas of plainly malicious requests
TEST_SETS = ("malicious_test", "dna_test", "dna_other_test", "reformulated_test", "utility_test", "over_rejection_test")
VALIDATION_SETS = ("val_malicious", "val_dna_other", "val_normal", "val_instructions", "val_over_rejection")



def cut(rows: list[dict], *sizes: int) -> list[list[dict]]:
    """Consecutive slices of the given sizes, then the rest."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(rows[start:start + size])
        start += size
    return pieces + [rows[start:]]


def split_dna(rows: list[dict], exclude: list[str], splits: Splits, seed: int) -> dict[str, list[dict]]:
    """Do-Not-Answer cut into test / validation / alignment pool, the two malicious areas apart from the other
    three (those are cut per area, so each is represented in test and validation)."""
    rows = builders.unique_rows([{**r, "kind": "malicious"} for r in rows], exclude=exclude)
    main = builders.seeded_order([r for r in rows if r.get("risk_area") in DNA_AREAS], seed)
    parts = {"dna_test": [], "val_dna": [], "align_dna": [], "dna_other_test": [], "val_dna_other": [],
             "align_dna_other": []}
    parts["dna_test"], parts["val_dna"], parts["align_dna"] = cut(main, splits.dna_test, splits.dna_val)
    for area in sorted({r.get("risk_area") for r in rows} - set(DNA_AREAS)):
        ordered = builders.seeded_order([r for r in rows if r.get("risk_area") == area], seed)
        test, val, pool = cut(ordered, splits.dna_other_test, splits.dna_other_val)
        parts["dna_other_test"] += test
        parts["val_dna_other"] += val
        parts["align_dna_other"] += pool
    parts["align_dna_other"] = builders.seeded_order(parts["align_dna_other"], seed)
    return parts


def split_sources(data_dir: Path, splits: Splits, seed: int, attack_pairs: int, locate_over_rejection: int
                  ) -> dict[str, list[dict]]:
    """Every set of a run by file name (see Splits): disjoint where they must be, nothing evaluated is trained on.
    attack_pairs: pairs of each attack set; locate_over_rejection: over-rejection prompts of the scaling search."""
    mal_train, mal_test = builders.split_malicious(data.read_dataset(data_dir / "harmbench.jsonl"), 0.5, seed)
    sets = {"malicious_test": mal_test}
    val_harmbench, sets["align_harmbench"] = cut(mal_train, splits.harmbench_val)
    dna = split_dna(data.read_dataset(data_dir / "donotanswer.jsonl"), [r["prompt"] for r in mal_train + mal_test],
                    splits, seed)
    sets.update({k: v for k, v in dna.items() if k != "val_dna"})
    sets["val_malicious"] = val_harmbench + dna["val_dna"]
    sets["reformulated_test"] = builders.reformulated(mal_test + dna["dna_test"], seed)
    pairs = builders.normal_pairs(data.read_dataset(data_dir / "sharegpt.jsonl"), seed)
    sets["utility_test"], sets["val_normal"], attack_pool, sets["normal_align"] = cut(
        pairs, splits.sharegpt_test, splits.sharegpt_val, splits.attack_pool)
    over_prompts = data.bundled_prompts("over_rejection")
    over = builders.seeded_order([{"prompt": q, "kind": "over_rejection"} for q in over_prompts],
                                 seed)
    sets["over_rejection_test"], locate_over, sets["val_over_rejection"], sets["over_rejection_align"] = cut(
        over, splits.over_test, splits.over_locate, splits.over_val)
    sets["over_rejection_locate"] = locate_over[:locate_over_rejection]
    instructions = builders.seeded_order([{"prompt": q, "kind": "normal"} for q in data.bundled_prompts("normal")],
                                         seed)
    sets["val_instructions"], sets["instructions_align"], sets["normal_cosine"] = cut(
        instructions, splits.instructions_val, splits.instructions_align)
    first, second = attack_pool[:attack_pairs], attack_pool[attack_pairs:2 * attack_pairs]
    sets["attack_normal"] = first
    sets["attack_implicit"] = builders.implicit_attack(first)
    sets["attack_backdoor"] = builders.backdoor_mix(first + second, seed=seed, n_backdoor=attack_pairs // 2)
    return sets


def check_disjoint(sets: dict[str, list[dict]]) -> None:
    """No prompt of a test or validation set appears in any other set (training pools included), and the
    reformulated requests come from the malicious test splits only."""
    held_out = set(TEST_SETS) | set(VALIDATION_SETS)
    owner: dict[str, str] = {}
    for name, rows in sets.items():
        for key in {builders.prompt_key(r["prompt"]) for r in rows}:
            other = owner.setdefault(key, name)
            if other != name and held_out & {other, name}:
                raise DataError(f"prompt {key[:60]!r} is in both {other} and {name}")
    tested = {builders.prompt_key(r["prompt"]) for r in sets["malicious_test"] + sets["dna_test"]}
    strays = [r["original"] for r in sets["reformulated_test"] if builders.prompt_key(r["original"]) not in tested]
    if strays:
        raise DataError(f"reformulated_test: {strays[0][:60]!r} is not a malicious test prompt")


def build_sets(data_dir: Path, out: Path, splits: Splits, seed: int, attack_pairs: int, locate_over_rejection: int
               ) -> None:
    """Write every set of the run as JSONL with its manifest (the harmful mix is its own step: its answers come
    from the unaligned model)."""
    sets = split_sources(data_dir, splits, seed, attack_pairs, locate_over_rejection)
    check_disjoint(sets)
    sources = {"harmbench": data_dir / "harmbench.jsonl", "donotanswer": data_dir / "donotanswer.jsonl",
               "sharegpt": data_dir / "sharegpt.jsonl", "over_rejection": data.PROMPTS_DIR / "over_rejection.txt",
               "normal": data.PROMPTS_DIR / "normal.txt"}
    for name, rows in sets.items():
        builders.write_dataset(out / f"{name}.jsonl", rows, builder=f"splits.split_sources: {name}", seed=seed,
                               sources=list(sources.values()), params={"splits": asdict(splits)})
