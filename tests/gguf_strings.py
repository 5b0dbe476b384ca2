"""Deterministic, varied test strings for tokenizer parity: scripts, emoji, digits, code, whitespace, chat turns."""

from __future__ import annotations

import random

FRAGMENTS = [
    # plain text, contractions, case
    "Hello world", "hello, World!", "HELLO WORLD", "I'm sure you've seen it; they'll say we'd don't.",
    "It'S A TeSt", "The quick brown fox jumps over the lazy dog.", "a", "", " ", "x y z",
    # accents and other scripts
    "naïve café, déjà vu, Ångström, Straße", "Ελληνικά γράμματα", "Привет, как дела?", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Tiếng Việt có dấu", "İstanbul ılık",
    # CJK
    "你好，世界！", "日本語のテキストです。カタカナとひらがな", "한국어 문장입니다", "漢字かな交じり文、全角　スペース",
    # emoji, joiners, flags, variation selectors, combining marks, zero-width
    "😀😃😄😁", "👩‍👩‍👧‍👦 family", "🇫🇷🇯🇵🏳️‍🌈", "👍🏽 ok", "❤️ ♥ ☺︎", "e\u0301 vs \u00e9", "zero\u200bwidth\u200cjoin\u200d",
    "\ufeffBOM at start", "mathematical 𝔸𝕓𝕔 𝒳", "\U0001f9ea\U0001fae0 new emoji",
    # digits and numbers
    "1", "12", "123", "1234567890", "3.14159", "-42", "1,000,000", "2026-11-22T09:30:00Z", "+1 (555) 010-9999",
    "v1.2.3-rc4", "0x1F 0b1010 1e-5", "٣٤٥ ١٢", "１２３ full-width",
    # code
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = i; }",
    'const s = `${a}` + "b";', '{"key": [1, 2, {"nested": null}], "ok": true}', "<div class=\"a\">&amp;</div>",
    "SELECT * FROM t WHERE id = 3;", "import numpy as np\nnp.zeros((3, 4))", "#include <stdio.h>",
    "if x != y && z >= 0 || !w:", "path/to/file_name.py:123", "https://example.com/a?b=c&d=e#f", "user@example.org",
    # whitespace runs
    "two  spaces", "three   spaces", "    indented", "trailing   ", "\ttab\t\ttabs", "line\nbreak", "para\n\n\nbreaks",
    "crlf\r\nline", "mixed \t \n \r\n end", "   ", "\n", "\n\n", "\t", "a\u00a0nbsp", "   1", "  42 ", "\n 7",
    # punctuation and symbols
    "!!!???...", "--- *** ___", "«quotes» “curly” ‘single’", "€100 £5 ¥300 ₹20", "≤ ≥ ≠ ∞ ∑ √", "a/b\\c|d",
    "(((nested)))", "' \" ` '", "...", "—–-",
    # long and repetitive
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "supercalifragilisticexpialidocious", "ha" * 30, "🙂" * 12,
    "Pneumonoultramicroscopicsilicovolcanoconiosis", "x" * 5 + " " * 7 + "y" * 5,
]

WORDS = ["the", "model", "safety", "layer", "refuse", "answer", "😀", "数据", "Ünïcode", "42", "3.5", "code()",
         "\n", "  ", "\t", "don't", "HTTP/1.1", "#", "->", "é", "日本", "über", "x_y", "[1]"]


def varied_strings(specials: list[str] = (), count: int = 240, seed: int = 0) -> list[str]:
    """The fixed fragments, chat turns built from `specials` (the model's special-token texts), then seeded
    random mixtures of fragments and words, `count` strings in all."""
    rng = random.Random(seed)
    out = list(FRAGMENTS)
    out += _chat_turns(list(specials), rng)
    while len(out) < count:
        parts = rng.sample(FRAGMENTS, rng.randint(1, 3)) + rng.choices(WORDS, k=rng.randint(0, 6))
        rng.shuffle(parts)
        sep = rng.choice([" ", "", "\n", "  ", "\t", ", "])
        out.append(sep.join(parts))
    return out[:count]


def _chat_turns(specials: list[str], rng: random.Random) -> list[str]:
    """Strings with special tokens where chat templates put them, and some glued to text or repeated."""
    if not specials:
        return []
    out = []
    for i in range(20):
        a, b = rng.choice(specials), rng.choice(specials)
        text = rng.choice(FRAGMENTS)
        out.append(rng.choice([
            f"{a}user\n{text}{b}\n{a}assistant\n",
            f"{a}{text}{b}",
            f"{text}{a}{a}{b} {text}",
            f" {a} {text} {b} ",
            f"{a}system\nYou are helpful.{b}\n{a}user\n{text}{b}\n",
        ]))
    out.append("".join(specials))
    out.append(" ".join(specials))
    return out
