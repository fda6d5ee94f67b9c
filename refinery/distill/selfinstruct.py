"""Self-instruct building blocks: teacher prompts, robust parsers, rating and deduplication.

Pure Python (no torch), so the parsing and filtering rules are unit-tested on messy text.
A small teacher (SmolLM2-135M) follows a *format* it has just seen far better than an
instruction, so every prompt shows real seed items in the target format and begins the
teacher's reply for it ("1.", "Question:", "Rating: ").
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

from refinery.core.tasks import Item

RATINGS = [str(k) for k in range(1, 11)]
"""The rating choices scored by the teacher: 1 (wrong) .. 10 (correct and helpful)."""


@dataclass(frozen=True)
class Example:
    """A solved seed item shown to the teacher: its question and its gold answer text."""

    question: str
    answer: str
    wrong: str = ""
    """A wrong choice of the same item (for the rating prompt's low-score example)."""


def example_of(item: Item) -> Example:
    """The seed item as question + gold answer (+ one wrong choice when it has one)."""
    wrong = next((c for i, c in enumerate(item.choices) if i != item.answer), "")
    return Example(item.question.strip(), item.gold.strip(), wrong.strip())


def _shots(examples: list[Example]) -> str:
    return "\n\n".join(f"Question: {e.question}\nAnswer: {e.answer}" for e in examples)


def subtopic_request(description: str, example: Example | None, n: int) -> tuple[str, str]:
    """(user message, reply prefix) asking for `n` sub-topics near a seed question."""
    shown = f" Here is an example question:\n{example.question}\n\n" if example else "\n\n"
    user = (f"I am writing practice questions about {description}.{shown}"
            f"List {n} different, specific topics for new questions of this kind, one short topic per line.")
    return user, "1."


def pair_request(description: str, topic: str, examples: list[Example]) -> tuple[str, str]:
    """(user message, reply prefix) asking for one question/answer pair on `topic`."""
    shots = f"Examples:\n\n{_shots(examples)}\n\n" if examples else ""
    user = (f"Write one new question about {description}, on the topic: {topic}. "
            f"Then give its short, correct answer.\n\n{shots}"
            "Use the same format: a line starting with 'Question:' and a line starting with 'Answer:'.")
    return user, "Question:"


def rating_request(question: str, answer: str, examples: list[Example]) -> tuple[str, str]:
    """(user message, reply prefix) asking the teacher to rate a pair 1-10.

    Seed items with their gold answer (rated 9) and with a wrong choice (rated 2) anchor the
    scale, so the rating reflects correctness rather than the teacher's favourite digit.
    """
    shots = []
    for e in examples:
        shots.append(f"Question: {e.question}\nAnswer: {e.answer}\nRating: 9")
        if e.wrong:
            shots.append(f"Question: {e.question}\nAnswer: {e.wrong}\nRating: 2")
    anchor = ("Examples:\n\n" + "\n\n".join(shots) + "\n\n") if shots else ""
    user = ("Rate the answer to the question from 1 (wrong or useless) to 10 (correct and helpful).\n\n"
            f"{anchor}Question: {question}\nAnswer: {answer}")
    return user, "Rating: "


def expected_rating(logprobs: list[float]) -> float:
    """Expected 1-10 rating from the log-probs of the choices `RATINGS` ("1" .. "10").

    A weak teacher rarely writes a parseable "Score: 7", so the score is the expected value
    of its next-token distribution over the rating tokens. Digits are single tokens in
    common tokenizers, so "1" also carries the mass of "10" (= "1" then "0"): the share of
    "1" that is really "10" is taken off before normalizing.
    """
    if len(logprobs) != len(RATINGS):
        raise ValueError(f"expected {len(RATINGS)} log-probs (ratings 1..10), got {len(logprobs)}")
    top = max(logprobs)
    p = [math.exp(lp - top) for lp in logprobs]
    p[0] = max(p[0] - p[9], 0.0)
    z = sum(p)
    return sum((k + 1) * pk for k, pk in enumerate(p)) / z if z > 0 else 1.0


_ITEM_PREFIX = re.compile(r"^\s*(?:\d+\s*[.):-]|[-*\u2022]|topic\s*\d*\s*:)\s*", re.I)


def parse_subtopics(reply: str, n: int) -> list[str]:
    """Up to `n` distinct topics from a (numbered, bulleted or comma-separated) list reply."""
    lines = [ln for ln in reply.splitlines() if ln.strip()]
    if len(lines) == 1 and lines[0].count(",") >= 2:  # "a, b, c" on one line
        lines = lines[0].split(",")
    topics, seen = [], set()
    for line in lines:
        t = _ITEM_PREFIX.sub("", line).strip().strip("*_\"'").strip()
        t = re.sub(r"\s*[:.;,]+$", "", t).strip()
        key = normalize(t)
        if not (3 <= len(t) <= 100) or not key or key in seen or t.lower().startswith(("here ", "sure")):
            continue
        seen.add(key)
        topics.append(t)
        if len(topics) == n:
            break
    return topics


_PAIR = re.compile(r"question\s*:\s*(?P<q>.+?)\s*\banswer\s*:\s*(?P<a>.+?)\s*(?=\n\s*\n|\n\s*question\s*:|$)",
                   re.I | re.S)


def parse_pair(reply: str) -> tuple[str, str] | None:
    """(question, answer) from a reply that continues "Question:"; None when malformed."""
    m = _PAIR.search("Question:" + reply)
    if not m:
        return None
    q = " ".join(m.group("q").split())
    a = m.group("a").strip().split("\n")[0].strip()  # the answer's first line; later lines are chatter
    a = re.sub(r"\s*(rating|score)\s*:.*$", "", a, flags=re.I).strip()
    if not (10 <= len(q) <= 600) or not (1 <= len(a) <= 300):
        return None
    if re.search(r"\b(question|answer)\s*:", q, re.I):  # a repetition loop, not one question
        return None
    if not re.search(r"[a-z]{2}", q, re.I) or not re.search(r"\w", a):
        return None
    return q, a


_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: the key for exact duplicates."""
    return " ".join(text.lower().translate(_PUNCT).split())


class NearDupIndex:
    """Finds texts whose word sets overlap an indexed text by Jaccard >= `threshold`."""

    def __init__(self, threshold: float = 0.8):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.sets: list[frozenset[str]] = []
        self.exact: set[str] = set()
        self.postings: dict[str, list[int]] = {}

    def find(self, text: str) -> bool:
        """True when `text` equals (normalized) or nearly duplicates an indexed text."""
        key = normalize(text)
        if key in self.exact:
            return True
        words = frozenset(key.split())
        if not words:
            return False
        # Prefix filter: a text with Jaccard >= t shares >= ceil(t*|words|) of these words, so it
        # holds at least one of any |words| - ceil(t*|words|) + 1 of them; probe the rarest ones.
        need = len(words) - math.ceil(self.threshold * len(words) - 1e-9) + 1
        probe = sorted(words, key=lambda w: (len(self.postings.get(w, ())), w))[:need]
        for i in {i for w in probe for i in self.postings.get(w, ())}:
            k = len(words & self.sets[i])
            if k / (len(words) + len(self.sets[i]) - k) >= self.threshold:
                return True
        return False

    def add(self, text: str) -> None:
        key = normalize(text)
        self.exact.add(key)
        i = len(self.sets)
        self.sets.append(frozenset(key.split()))
        for w in self.sets[i]:
            self.postings.setdefault(w, []).append(i)
