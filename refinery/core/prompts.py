"""The one text format shared by training data, calibration data and evaluation prompts.

Training and evaluation use the same plain `Question: ... Answer:` layout so that what the
student learns on generated data transfers to the lm-eval cloze tasks.
"""
from __future__ import annotations


def prompt_text(instruction: str, input: str = "") -> str:
    """The part the model is conditioned on."""
    body = instruction.strip()
    if input and input.strip():
        body = f"{body}\n{input.strip()}"
    return f"Question: {body}\nAnswer:"


def example_text(row: dict) -> tuple[str, str]:
    """(prompt, full text) for an Alpaca-style row {instruction, input, output}. A row may carry its
    task's own layout (`prompt`, and `delimiter` when not a space: lm-eval tasks' seed answers)."""
    if row.get("prompt") is not None:
        return row["prompt"], f"{row['prompt']}{row.get('delimiter', ' ')}{row['output'].strip()}"
    prompt = prompt_text(row["instruction"], row.get("input", ""))
    return prompt, f"{prompt} {row['output'].strip()}"
