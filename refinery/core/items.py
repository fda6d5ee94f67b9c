"""A task's items and the task itself: what generate seeds from and evaluate holds out."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from refinery.core.prompts import prompt_text


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: `answer` indexes `choices`."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    answers: tuple[str, ...] = ()
    """Generative items: the reference answers (choices is empty, answer -1)."""
    prompt: str | None = None
    """The exact context when the task has its own layout (lm-eval tasks); else prompt_text(question)."""
    delimiter: str = " "
    """What joins the context and an answer (lm-eval's target_delimiter)."""

    @property
    def gold(self) -> str:
        return self.choices[self.answer] if self.choices else self.answers[0]

    def context(self) -> str:
        """The text the model is conditioned on, in this task's one layout (generate and evaluate)."""
        return self.prompt if self.prompt is not None else prompt_text(self.question)


def bucket(key: str) -> float:
    """An item's place in [0, 1] by its id's hash: below eval_fraction means held out."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


@dataclass(frozen=True)
class Task:
    """One task of a run, resolved: its items split into seeds and held-out items."""

    name: str
    description: str
    kind: str
    """`multiple_choice` or `generate`."""
    source: str
    """`bundled`, `file` or `lm_eval`."""
    seed: tuple[Item, ...]
    held: tuple[Item, ...]
    digest: str | None
    """Hash of the task's data (None for bundled tasks: the package version fixes them)."""
    answer_regex: str | None = None
    max_new_tokens: int = 32
    until: tuple[str, ...] = ("\n",)
    """Generative tasks: where an answer ends."""
    opaque: bool = False
    """An lm-eval task whose documents are not one context + choices (winogrande): no items here."""


def drop_overlap(seed: list[Item], held: list[Item]) -> list[Item]:
    """Seed items whose question is not also a held-out question (after case and spacing)."""
    taken = {_key(it.question) for it in held}
    return [it for it in seed if _key(it.question) not in taken]


def _key(question: str) -> str:
    return " ".join(question.lower().split())
