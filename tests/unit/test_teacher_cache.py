"""The teacher's hidden-state cache (refinery/train/teacher.py): kept for a plain causal LM, also in
bf16, and refused for a model whose logits are not lm_head(last hidden state)."""
from __future__ import annotations

import logging

import pytest
import torch


def _rows(tok, n: int = 96) -> list[list[int]]:
    from refinery.core.tasks import split

    items, _ = split("siqa", 0.5)
    return [tok(f"Question: {it.question}\nAnswer: {it.choices[it.answer]}")["input_ids"] for it in items[:n]]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoTokenizer

    return smollm2_path, AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_is_kept_and_gives_the_live_logits(smollm2, dtype):
    from transformers import AutoModelForCausalLM

    from refinery.train.data import collate
    from refinery.train.teacher import Teacher

    path, tok = smollm2
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    seqs = _rows(tok)
    teacher = Teacher(model, seqs, tok.pad_token_id, torch.device("cpu"), cache=True, batch_size=16)
    assert teacher.hidden is not None  # in bf16 too: batch-composition noise is not a reason to run live
    rows = [0, 3, 7]
    ids, attn = collate([seqs[i] for i in rows], tok.pad_token_id)
    with torch.no_grad():
        live = model(input_ids=ids, attention_mask=attn).logits.float()
    cached = teacher.logits(rows, ids, attn).float()
    keep = attn.bool()
    rel = ((cached[keep] - live[keep]).norm() / live[keep].norm()).item()
    assert rel < (1e-4 if dtype == torch.float32 else 0.05), rel
    # the distributions the KD loss sees agree: total variation per position
    tv = 0.5 * (cached[keep].softmax(-1) - live[keep].softmax(-1)).abs().sum(-1).max().item()
    assert tv < (1e-4 if dtype == torch.float32 else 0.1), tv
    print(f"{dtype}: relative error {rel:.4f}, max total variation {tv:.4f}")


def test_scaled_logits_make_the_teacher_run_live(smollm2, caplog):
    """A model that scales its logits after lm_head (as Cohere's logit_scale does) cannot use the cache."""
    from transformers import AutoModelForCausalLM

    from refinery.train.teacher import Teacher

    path, tok = smollm2
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def scale(mod, args, out):
        out["logits"] = out["logits"] * 0.9
        return out

    model.register_forward_hook(scale)
    with caplog.at_level(logging.WARNING, logger="refinery.train"):
        teacher = Teacher(model, _rows(tok), tok.pad_token_id, torch.device("cpu"), cache=True, batch_size=16)
    assert teacher.hidden is None
    assert "not lm_head(last hidden state)" in caplog.text and "running the teacher live" in caplog.text


def test_a_cache_that_does_not_match_the_rows_is_refused(smollm2, caplog, monkeypatch):
    """Hidden states one position off (a padding or slicing fault) fail the end-to-end check."""
    from transformers import AutoModelForCausalLM

    from refinery.train.teacher import Teacher

    path, tok = smollm2
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    made = Teacher._hidden_states
    monkeypatch.setattr(Teacher, "_hidden_states",
                        lambda self, seqs, bs: [h.roll(1, dims=0) for h in made(self, seqs, bs)])
    with caplog.at_level(logging.WARNING, logger="refinery.train"):
        teacher = Teacher(model, _rows(tok), tok.pad_token_id, torch.device("cpu"), cache=True, batch_size=16)
    assert teacher.hidden is None and "differ from the live ones" in caplog.text
