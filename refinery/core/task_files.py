"""A user's task file read into items, every problem named by file, line and field.

Two layouts, one task kind per file:

- JSONL, one item per line. Multiple choice: `question`, `choices` (>= 2 distinct strings),
  `answer` (the index of the right choice, or its text). Generative: `question` and `answers`
  (one or more reference strings; `answer` as a single string also works). Optional: `id`
  (unique), `split` (`train`/`seed` or `test`/`eval`; items without one are split by hash).
- BIG-bench JSON: `{"examples": [{"input": ..., "target_scores": {choice: 0 or 1}}]}` (multiple
  choice) or `{"input": ..., "target": str or [str]}` (generative).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from refinery.core.config import ConfigError

SPLITS = {"train": "seed", "seed": "seed", "test": "held", "eval": "held"}


def read_task_file(path: str | Path, where: str) -> tuple[str, list[dict]]:
    """(kind, rows) of a task file; `kind` is `multiple_choice` or `generate`. Each row holds
    id, question, choices, answer, answers, split (None when the file gives none) and `at` (its
    place in the file, for messages). `where` names the config key, e.g. tasks.custom.x.file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: {str(p)!r} not found: give the path of a JSONL or BIG-bench JSON file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read {str(p)!r}: {e}") from e
    if not text.strip():
        raise ConfigError(f"{where}: {str(p)!r} is empty: write one item per line (see README, 'Your own task')")
    raw = _bigbench(p, text) if _is_bigbench(p, text) else _jsonl(p, text)
    rows = [_row(p, at, r) for at, r in raw]
    kinds = {r["kind"] for r in rows}
    if len(kinds) > 1:
        first = rows[0]
        odd = next(r for r in rows if r["kind"] != first["kind"])
        raise ConfigError(f"{_loc(p, odd['at'])}: a {odd['kind']} item in a file whose first item "
                          f"({first['at']}) is {first['kind']}: one kind of task per file")
    _check_unique(p, rows)
    return rows[0]["kind"], rows


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _loc(p: Path, at: str) -> str:
    """`file:line` for JSONL lines, `file: examples[i]` for BIG-bench entries."""
    return f"{p}:{at.removeprefix('line ')}" if at.startswith("line ") else f"{p}: {at}"


def _is_bigbench(p: Path, text: str) -> bool:
    """A whole-file JSON object with `examples`; a file that is neither that nor JSONL is an error at
    the place the whole-file parse failed (a pretty-printed BIG-bench file with a syntax error)."""
    if not text.lstrip().startswith("{"):
        return False
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise ConfigError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}): write JSONL, one "
                              "object per line, or one BIG-bench JSON object") from None
        return False  # JSONL: its first line is an object of its own
    return isinstance(data, dict) and "examples" in data


def _jsonl(p: Path, text: str) -> list[tuple[str, dict]]:
    out = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno}): one JSON object per line") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{p}:{n}: expected a JSON object with question/choices/answer, got {type(obj).__name__}")
        out.append((f"line {n}", obj))
    return out


def _bigbench(p: Path, text: str) -> list[tuple[str, dict]]:
    examples = json.loads(text)["examples"]
    if not isinstance(examples, list) or not examples:
        raise ConfigError(f"{p}: `examples` must be a non-empty list of {{input, target_scores}} objects")
    out = []
    for i, ex in enumerate(examples):
        at = f"examples[{i}]"
        if not isinstance(ex, dict):
            raise ConfigError(f"{p}: {at}: expected an object with input and target_scores")
        row = {"question": ex.get("input"), "id": ex.get("id")}
        if "target_scores" in ex:
            scores = ex["target_scores"]
            if not isinstance(scores, dict) or len(scores) < 2:
                raise ConfigError(f"{p}: {at}: field `target_scores` needs >= 2 choices, got {scores!r}")
            best = [c for c, s in scores.items() if s == 1]
            if len(best) != 1:
                raise ConfigError(f"{p}: {at}: field `target_scores` must score exactly one choice 1, got {scores!r}")
            row.update(choices=list(scores), answer=best[0])
        elif "target" in ex:
            row["answers"] = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
        else:
            raise ConfigError(f"{p}: {at}: needs `target_scores` (multiple choice) or `target` (generative)")
        out.append((at, row))
    return out


def _row(p: Path, at: str, r: dict) -> dict:
    def bad(field: str, why: str):
        raise ConfigError(f"{_loc(p, at)}: field `{field}`: {why}")

    q = r.get("question")
    if not isinstance(q, str) or not q.strip():
        bad("question", f"missing or empty (got {q!r}); every item needs a question string")
    split = r.get("split")
    if split is not None and split not in SPLITS:
        bad("split", f"{split!r} is not one of train, seed, test, eval (or leave it out to split by hash)")
    ident = r.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        bad("id", f"expected a string or integer, got {ident!r}")
    row = {"at": at, "question": q.strip(), "split": SPLITS.get(split), "choices": (), "answer": -1, "answers": ()}
    if "choices" in r:
        ch = r["choices"]
        if not isinstance(ch, list) or not all(isinstance(c, str) and c.strip() for c in ch):
            bad("choices", f"expected a list of non-empty strings, got {ch!r}")
        if len(ch) < 2:
            bad("choices", f"needs at least 2 choices, got {len(ch)}")
        if len({c.strip() for c in ch}) != len(ch):
            bad("choices", f"repeats a choice: {ch!r}")
        row["choices"] = tuple(c.strip() for c in ch)
        a = r.get("answer")
        if a is None:
            bad("answer", "missing: give the index of the right choice (0-based) or its text")
        if isinstance(a, bool) or not isinstance(a, (int, str)):
            bad("answer", f"expected an index or a choice's text, got {a!r}")
        if isinstance(a, int):
            if not 0 <= a < len(ch):
                bad("answer", f"index {a} is out of range for {len(ch)} choices (0..{len(ch) - 1})")
            row["answer"] = a
        else:
            if a.strip() not in row["choices"]:
                bad("answer", f"{a!r} is none of the choices {list(row['choices'])!r}")
            row["answer"] = row["choices"].index(a.strip())
        row["kind"] = "multiple_choice"
    else:
        ans = r.get("answers", r.get("answer"))
        ans = [ans] if isinstance(ans, str) else ans
        if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans):
            bad("answers", f"expected `choices` + `answer` (multiple choice) or one or more reference "
                           f"answer strings (generative), got {r.get('answers', r.get('answer'))!r}")
        row["answers"] = tuple(a.strip() for a in ans)
        row["kind"] = "generate"
    content = json.dumps([row["question"], row["choices"], row["answers"]])
    row["id"] = str(ident) if ident is not None else hashlib.sha256(content.encode()).hexdigest()[:12]
    row["content"] = content
    return row


def _check_unique(p: Path, rows: list[dict]) -> None:
    ids, items = {}, {}
    for r in rows:
        if r["content"] in items:
            raise ConfigError(f"{p}: {r['at']} is the same item as {items[r['content']]} (same question and "
                              "choices/answers): remove the repeat")
        if r["id"] in ids:
            raise ConfigError(f"{p}: {r['at']} repeats the id {r['id']!r} of {ids[r['id']]}: ids must be unique")
        ids[r["id"]] = items[r["content"]] = r["at"]
