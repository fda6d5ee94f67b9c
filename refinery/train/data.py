"""Training data for the distill stage: generated rows -> token ids -> deterministic batches.

The batch order is a pure function of (seed, sample position): sample i of the run is item
perm_e[i mod n] with e = i // n and perm_e a permutation seeded by (seed, e). Resuming needs
only the position, and a later multi-rank run can take a slice of each global batch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from refinery.core.config import InputError
from refinery.core.prompts import example_text

REQUIRED = ("instruction", "output")


def load_rows(path: str | Path) -> list[dict]:
    """Read generate's Alpaca rows, failing clearly on a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} not found: run `refinery generate CONFIG` first")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n} is not valid JSON ({e}); re-run `refinery generate CONFIG --force`") from e
            missing = [k for k in REQUIRED if not isinstance(row.get(k), str) or not row[k].strip()]
            if missing:
                raise InputError(f"{path}:{n} lacks non-empty {', '.join(missing)}: expected Alpaca rows "
                                 '{"instruction", "input", "output", "task", "score"}')
            rows.append(row)
    if not rows:
        # generate refuses to write an empty file (it names score_threshold then), so this one was
        # emptied or supplied by hand
        raise InputError(f"{path} holds no rows (generate never writes an empty file): re-run "
                         "`refinery generate CONFIG --force`, or put Alpaca rows in your own data file")
    return rows


def tokenize_rows(rows: list[dict], tokenizer, max_seq_len: int) -> list[list[int]]:
    """Token ids of each row's full text (prompt + answer + eos), cut to max_seq_len."""
    out = []
    for row in rows:
        _, text = example_text(row)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        # eos teaches the student where an answer ends (the teacher's distribution there says so too).
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids[:max_seq_len])
    return out


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items for run positions start .. start+count-1: a fresh seeded permutation per epoch."""
    out, perms = [], {}
    for i in range(start, start + count):
        epoch = i // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][i % n])
    return out


def collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), both (B, L) long."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask
