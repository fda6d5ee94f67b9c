"""torchtune components for benchmarks/peers/distill_vs_peers.py: the exact batches our distill draws.

Runs inside the torchtune venv (imported by `tune run` through PYTHONPATH); imports nothing of ours.
The KD recipe builds its dataloader from `dataset` (called with the tokenizer) with its own collate
(pad tokens with `tokenizer.pad_id`, labels with -100) and a sampler we set to shuffle: false, so a
dataset that lists our batches' sequences in step order gives the recipe the same batches as ours.
labels = tokens: the recipe shifts them, so every real token is counted, as in ours.
"""
from __future__ import annotations

import json
from pathlib import Path


class IdsOnly:
    """The part of a torchtune ModelTokenizer the recipe uses when the data is already token ids."""

    def __init__(self, pad_id: int, max_seq_len: int | None = None):
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len


def fixed_batches(tokenizer, path: str) -> list[dict]:
    """Every sequence of `path` (a JSON list of batches of token-id lists) in step order."""
    batches = json.loads(Path(path).read_text())
    return [{"tokens": seq, "labels": list(seq)} for batch in batches for seq in batch]
