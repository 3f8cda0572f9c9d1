"""Seeded generators for the corpus's synthetic domains.

Two arithmetic domains state the *same* facts in two surface forms, digits (``17 + 25 = 42.``) and
number words (``seventeen plus twenty-five equals forty-two.``), so later work can steer or measure
a model on one controlled difference. A third generator writes small JSON records. Everything takes
an explicit ``random.Random`` so the corpus build is reproducible; the parsers let evaluation code
check exact-match answers.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

STYLES = ("digits", "words")
OPERATIONS = ("plus", "minus", "times")
MAX_OPERAND = 99

_SYMBOL = {"plus": "+", "minus": "-", "times": "*"}
_FROM_SYMBOL = {v: k for k, v in _SYMBOL.items()}
_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((1_000_000, "million"), (1_000, "thousand"), (100, "hundred"))


def number_to_words(n: int) -> str:
    """Write an integer in English words: 21 -> 'twenty-one', 1204 -> 'one thousand two hundred four'.

    No 'and' is used, negative numbers start with 'negative'; |n| must be below one billion.
    """
    if n < 0:
        return "negative " + number_to_words(-n)
    if n >= 1_000_000_000:
        raise ValueError(f"number_to_words supports |n| < 10**9, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            words = f"{number_to_words(head)} {name}"
            return words + (f" {number_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


NUMBER_WORDS = frozenset([*_ONES, *_TENS[2:], *(name for _, name in _SCALES), "negative"])
"""Every word ``number_to_words`` writes (the word-style numbers of the synthetic corpus)."""

_WORD_VALUE = {w: i for i, w in enumerate(_ONES)} | {w: 10 * i for i, w in enumerate(_TENS) if i >= 2}
_SCALE_VALUE = {name: value for value, name in _SCALES}


def words_to_number(text: str) -> int:
    """Parse what :func:`number_to_words` writes back into an integer (raises ValueError otherwise)."""
    words = text.strip().split()
    if not words:
        raise ValueError("empty number")
    sign = 1
    if words[0] == "negative":
        sign, words = -1, words[1:]
    total = current = 0
    for word in words:
        if word in ("hundred",):
            current *= 100
        elif word in _SCALE_VALUE:
            total += current * _SCALE_VALUE[word]
            current = 0
        else:
            for part in word.split("-"):
                if part not in _WORD_VALUE:
                    raise ValueError(f"not a number word: {part!r}")
                current += _WORD_VALUE[part]
    value = sign * (total + current)
    if number_to_words(value) != text.strip():
        raise ValueError(f"not a canonical number: {text!r}")
    return value


@dataclass(frozen=True)
class ArithFact:
    """One arithmetic fact ``a <op> b``; ``result`` is computed, never stored."""

    a: int
    op: str
    b: int

    @property
    def result(self) -> int:
        if self.op == "plus":
            return self.a + self.b
        if self.op == "minus":
            return self.a - self.b
        if self.op == "times":
            return self.a * self.b
        raise ValueError(f"unknown operation {self.op!r}")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def random_fact(rng: random.Random) -> ArithFact:
    """Draw a fact with operands 0..99; for 'minus' the operands are ordered so the result is >= 0.

    The number of draws from ``rng`` does not depend on the style, so the same seed gives the same
    facts in both styles (digit/word twins).
    """
    op = OPERATIONS[rng.randrange(len(OPERATIONS))]
    a = rng.randint(0, MAX_OPERAND)
    b = rng.randint(0, MAX_OPERAND)
    if op == "minus" and b > a:
        a, b = b, a
    return ArithFact(a, op, b)


def fact_prompt(fact: ArithFact, style: str) -> tuple[str, str]:
    """Split a fact into (prompt, answer), e.g. ('17 + 25 =', ' 42.'); prompt + answer is the full line."""
    _check_style(style)
    if style == "digits":
        return f"{fact.a} {_SYMBOL[fact.op]} {fact.b} =", f" {fact.result}."
    return (
        f"{number_to_words(fact.a)} {fact.op} {number_to_words(fact.b)} equals",
        f" {number_to_words(fact.result)}.",
    )


def format_fact(fact: ArithFact, style: str) -> str:
    """One line: '17 + 25 = 42.' (digits) or 'seventeen plus twenty-five equals forty-two.' (words)."""
    prompt, answer = fact_prompt(fact, style)
    return prompt + answer


def arith_fact(rng: random.Random, style: str) -> str:
    """Draw one random fact and write it as a line in ``style`` ('digits' or 'words')."""
    _check_style(style)
    return format_fact(random_fact(rng), style)


def arith_document(rng: random.Random, style: str, n_lines: int) -> str:
    """A document of ``n_lines`` fact lines joined by newlines (no trailing newline)."""
    _check_style(style)
    return "\n".join(format_fact(random_fact(rng), style) for _ in range(n_lines))


_DIGITS_LINE = re.compile(r"^(-?\d+) ([+*-]) (-?\d+) = (-?\d+)\.$")
_WORDS_LINE = re.compile(r"^(.+?) (plus|minus|times) (.+?) equals (.+)\.$")


def parse_fact(line: str) -> tuple[ArithFact, int]:
    """Parse a line in either style into (fact, stated result); raises ValueError if malformed.

    The stated result is returned as written, so a caller can check it against ``fact.result``.
    """
    line = line.strip()
    m = _DIGITS_LINE.match(line)
    if m:
        return ArithFact(int(m[1]), _FROM_SYMBOL[m[2]], int(m[3])), int(m[4])
    m = _WORDS_LINE.match(line)
    if m:
        return ArithFact(words_to_number(m[1]), m[2], words_to_number(m[3])), words_to_number(m[4])
    raise ValueError(f"not an arithmetic fact line: {line!r}")


_FIRST = [
    "Ada",
    "Alan",
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Farah",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kai",
    "Lena",
    "Mia",
    "Noor",
    "Omar",
    "Pia",
    "Ravi",
    "Sara",
    "Tom",
    "Uma",
    "Vera",
    "Yan",
]
_LAST = [
    "Abe",
    "Brandt",
    "Costa",
    "Diaz",
    "Eze",
    "Fischer",
    "Garcia",
    "Haddad",
    "Ito",
    "Jensen",
    "Kim",
    "Lopez",
    "Moreno",
    "Novak",
    "Okafor",
    "Park",
    "Rossi",
    "Silva",
    "Tanaka",
    "Weber",
]
_CITIES = [
    "Accra",
    "Berlin",
    "Bogota",
    "Cairo",
    "Dublin",
    "Hanoi",
    "Kyoto",
    "Lagos",
    "Lima",
    "Lisbon",
    "Madrid",
    "Nairobi",
    "Oslo",
    "Paris",
    "Quito",
    "Seoul",
    "Sydney",
    "Tunis",
    "Vienna",
    "Warsaw",
]
_TAGS = [
    "alpha",
    "beta",
    "blue",
    "green",
    "red",
    "urgent",
    "new",
    "legacy",
    "beta-test",
    "vip",
    "trial",
    "archived",
]
_KINDS = ("customer", "order", "sensor")


def json_record(rng: random.Random, record_id: int) -> dict:
    """One flat-ish JSON-able record (customer, order or sensor reading) with seeded values."""
    kind = _KINDS[rng.randrange(len(_KINDS))]
    if kind == "customer":
        return {
            "id": record_id,
            "type": kind,
            "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
            "age": rng.randint(18, 90),
            "city": rng.choice(_CITIES),
            "active": rng.random() < 0.7,
            "tags": sorted(rng.sample(_TAGS, rng.randint(0, 3))),
        }
    if kind == "order":
        items = [
            {
                "sku": f"SKU-{rng.randint(100, 999)}",
                "qty": rng.randint(1, 9),
                "price": round(rng.uniform(1, 200), 2),
            }
            for _ in range(rng.randint(1, 3))
        ]
        return {
            "id": record_id,
            "type": kind,
            "customer_id": rng.randint(1, 9999),
            "items": items,
            "total": round(sum(i["qty"] * i["price"] for i in items), 2),
            "paid": rng.random() < 0.8,
        }
    return {
        "id": record_id,
        "type": kind,
        "sensor": f"{rng.choice(_CITIES).lower()}-{rng.randint(1, 40):02d}",
        "temperature_c": round(rng.uniform(-20, 40), 1),
        "humidity": rng.randint(5, 100),
        "ok": rng.random() < 0.9,
    }


def json_document(rng: random.Random, n_records: int, first_id: int = 1) -> str:
    """``n_records`` JSON records, one compact JSON object per line (JSON Lines, no trailing newline)."""
    return "\n".join(json.dumps(json_record(rng, first_id + i)) for i in range(n_records))
