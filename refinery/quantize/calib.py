"""The texts quantization calibrates on and checks its error on, from the generated rows."""
from __future__ import annotations

import logging
import random
from pathlib import Path

from refinery.core.config import InputError
from refinery.core.prompts import example_text
from refinery.train.data import load_rows as read_rows

log = logging.getLogger("refinery.quantize")


def load_rows(path: Path) -> list[dict]:
    """The generated Alpaca rows (checked as distill checks them), at least 2 of them."""
    if not path.is_file():
        raise FileNotFoundError(f"no calibration data at {path}: run `refinery generate` first")
    rows = read_rows(path)
    if len(rows) < 2:
        raise InputError(f"{path} has {len(rows)} rows; quantize needs at least 2 (calibration + error check): "
                         "generate more data (e.g. raise generate.seeds_per_task)")
    return rows


def split_texts(rows: list[dict], n_calib: int, n_error: int, seed: int) -> tuple[list[str], list[str]]:
    """(calibration texts, held-out error texts) in the shared prompt format; the two never overlap.

    At most a quarter of the rows (and at least one) is held out, so calibration keeps most of a
    small data set.
    """
    texts = [example_text(r)[1] for r in rows]
    random.Random(seed).shuffle(texts)
    k = max(1, min(n_error, len(texts) // 4))
    held_out, calib = texts[:k], texts[k:k + n_calib]
    if len(calib) < n_calib:
        log.warning("quantize: only %d calibration texts available (asked for %d)", len(calib), n_calib)
    return calib, held_out
