"""The offline task set: real multiple-choice benchmark items bundled with the package.

Each task's items are split once, deterministically, into a *seed* part (the teacher's
self-instruct seeds) and a held-out *eval* part that no training data is drawn from.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from refinery.core.config import check

DATA = Path(__file__).resolve().parent.parent / "data" / "benchmarks"

# name -> (file, one-line description used in prompts)
OFFLINE = {
    "siqa": ("social_iqa.json", "social situations and people's motivations, reactions and needs"),
    "mmlu_dev": ("mmlu_flan_cot_prompts.json", "exam questions across 57 academic subjects"),
    "strategyqa": ("strategyqa.json", "yes/no questions that need several reasoning steps"),
    "winowhy": ("winowhy.json", "pronoun resolution and whether a stated reason is correct"),
    "physical_intuition": ("physical_intuition.json", "everyday physics and how objects behave"),
    "general_knowledge": ("general_knowledge.json", "general knowledge questions"),
    "riddle_sense": ("riddle_sense.json", "riddles that need commonsense"),
    "logical_deduction": ("logical_deduction_three_objects.json", "ordering three objects from clues"),
}

# The method's eight benchmarks as lm-eval task names, for machines that have their data.
STANDARD = ["mmlu", "arc_easy", "commonsense_qa", "openbookqa", "hellaswag", "piqa", "siqa", "winogrande"]


@dataclass
class TasksConfig:
    """Which benchmark tasks the run targets and how their items are split."""

    names: list[str] = field(default_factory=lambda: ["siqa", "mmlu_dev", "strategyqa", "winowhy",
                                                     "physical_intuition"])
    """Offline task names (see refinery.core.tasks.OFFLINE) or lm-eval task names."""
    eval_fraction: float = 0.5
    """Share of each offline task's items held out for evaluation (the rest seed data generation)."""
    eval_limit: int | None = 200
    """At most this many held-out items per task are scored (None: all)."""

    def __post_init__(self):
        check(bool(self.names), "names", self.names, "at least one task name")
        check(0.0 < self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction, "a number in (0, 1)")
        check(self.eval_limit is None or self.eval_limit > 0, "eval_limit", self.eval_limit, "a positive integer or null")


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: `answer` indexes `choices`."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


def _bigbench(path: Path) -> list[Item]:
    items = []
    for ex in json.loads(path.read_text())["examples"]:
        scores = ex.get("target_scores") or {}
        if not scores or max(scores.values()) != 1:
            continue
        choices = tuple(scores)
        answer = [scores[c] for c in choices].index(1)
        q = ex["input"].strip()
        items.append(Item(_id(q), q, choices, answer))
    return items


_MMLU_CHOICE = re.compile(r"\(([A-D])\)\s*(.*?)\s*(?=\([A-D]\)|$)", re.S)


def _mmlu(path: Path) -> list[Item]:
    items = []
    for subject, prompt in json.loads(path.read_text()).items():
        for block in prompt.split("\n\nQ: ")[1:]:
            if "\n(A)" not in block or "The answer is (" not in block:
                continue
            question, rest = block.split("\n(A)", 1)
            options, _, answer_text = ("(A)" + rest).partition("\nA:")
            choices = [m.group(2).strip() for m in _MMLU_CHOICE.finditer(options.strip())]
            letter = answer_text.rsplit("The answer is (", 1)[1][:1]
            if len(choices) != 4 or letter not in "ABCD":
                continue
            q = f"{question.strip()}"
            items.append(Item(_id(subject + q), q, tuple(choices), "ABCD".index(letter)))
    return items


def _id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@lru_cache(maxsize=None)
def load_items(name: str) -> tuple[Item, ...]:
    if name not in OFFLINE:
        raise KeyError(f"{name!r} is not an offline task; known: {', '.join(OFFLINE)}")
    path = DATA / OFFLINE[name][0]
    items = _mmlu(path) if name == "mmlu_dev" else _bigbench(path)
    seen, unique = set(), []
    for it in items:  # some source files repeat questions
        if it.id not in seen:
            seen.add(it.id)
            unique.append(it)
    return tuple(unique)


def split(name: str, eval_fraction: float) -> tuple[list[Item], list[Item]]:
    """(seed items, eval items): stable under reordering, decided by each item's hash."""
    seed, held = [], []
    for it in load_items(name):
        bucket = int(it.id[:8], 16) / 0xFFFFFFFF
        (held if bucket < eval_fraction else seed).append(it)
    return seed, held


def description(name: str) -> str:
    return OFFLINE[name][1] if name in OFFLINE else name
