"""The evaluate stage (and the report on its output) on the tiny real models."""
from __future__ import annotations

import json
import shutil

import pytest

from refinery.core.manifest import dir_bytes, read_jsonl
from refinery.core.tasks import load_task
from refinery.evals.lmeval_tasks import held_out_docs

LIMIT = 6


def _own_loglikelihoods(model_path: str, docs: list[dict]) -> list[list[float]]:
    """log p(" choice" | prompt) per choice, computed here without lm-eval (fp32, one at a time)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    for doc in docs:
        ctx_ids = tok(doc["prompt"])["input_ids"]
        row = []
        for choice in doc["choices"]:
            ids = tok(doc["prompt"] + " " + choice)["input_ids"]
            with torch.inference_mode():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            row.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx_ids), len(ids))))
        out.append(row)
    return out


@pytest.mark.integration
def test_evaluate_scores_two_offline_tasks_and_reports(tiny_config, tiny_student, capsys):
    from refinery.evals import evaluate, report

    cfg = tiny_config(tasks={"eval_limit": LIMIT},
                      evaluate={"models": "[student_base, student]", "batch_size": 4, "dtype": "float32", "threads": 1,
                                "latency.prompt_tokens": 16, "latency.new_tokens": 6, "latency.repeats": 2})
    ctx = cfg.context()
    # The distilled student stands in as a copy of the base student until the quantize stage exists.
    shutil.copytree(tiny_student, ctx.run_dir / "quantize" / "merged")
    result = evaluate.run(ctx, cfg.evaluate)

    out = ctx.run_dir / "evaluate"
    for rel in result.outputs:
        assert (out / rel).exists(), rel
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["siqa", "strategyqa"] and set(res["models"]) == {"student_base", "student"}
    assert res["threads"] == 1 and res["eval_limit"] == LIMIT
    base, student = res["models"]["student_base"], res["models"]["student"]
    for m in (base, student):
        assert set(m["tasks"]) == {"siqa", "strategyqa"}
        for t in m["tasks"].values():
            assert t["n"] == LIMIT and 0.0 <= t["acc"] <= 1.0 and 0.0 <= t["acc_norm"] <= 1.0
            assert t["acc_stderr"] == pytest.approx((t["acc"] * (1 - t["acc"]) / (LIMIT - 1)) ** 0.5)
        assert m["mean_acc"] == pytest.approx(sum(t["acc"] for t in m["tasks"].values()) / 2)
        assert m["bytes"] == dir_bytes(tiny_student) > 10_000_000
        assert 20_000_000 < m["params"] < 60_000_000  # 2 of SmolLM2's 30 layers + its 28M embedding
        lat = m["latency"]
        assert 0.1 < lat["decode_ms_per_token"] < 5000 and lat["prefill_tokens_per_s"] > 1
        assert lat["new_tokens"] == 6 and lat["prompt_tokens"] == 16 and lat["batch_size"] == 1
        assert lat["threads"] == 1 and lat["dtype"] == "float32"
        # fp32 weights in memory: 4 bytes per parameter, plus small buffers (rotary frequencies)
        assert 4 * m["params"] <= lat["memory_bytes"] < 4.01 * m["params"]
    assert student["tasks"] == base["tasks"]  # same weights, same items -> same scores

    # lm-eval's per-item log-likelihoods equal an independent computation in the training layout.
    rows = [r for r in read_jsonl(out / "lmeval" / "student_base_samples.jsonl") if r["task"] == "siqa"]
    docs = held_out_docs(load_task(cfg.tasks, "siqa"), LIMIT)
    assert [r["item_id"] for r in sorted(rows, key=lambda r: r["doc_id"])] == [d["id"] for d in docs]
    own = _own_loglikelihoods(tiny_student, docs)
    for r in sorted(rows, key=lambda r: r["doc_id"]):
        assert r["loglikelihoods"] == pytest.approx(own[r["doc_id"]], abs=2e-3)
        best = max(range(len(own[r["doc_id"]])), key=own[r["doc_id"]].__getitem__)
        assert r["acc"] == float(best == docs[r["doc_id"]]["answer"])
    assert sum(r["acc"] for r in rows) / LIMIT == pytest.approx(base["tasks"]["siqa"]["acc"])

    rep = report.run(ctx, cfg.report)
    md = (ctx.run_dir / "report" / "REPORT.md").read_text()
    siqa = base["tasks"]["siqa"]
    assert f"| siqa | {LIMIT} | {siqa['acc']:.3f} ± {siqa['acc_stderr']:.3f} |" in md
    assert "no clear difference" in md or "identical scores" in md
    assert rep.outputs[:3] == ["REPORT.md", "accuracy.png", "size_vs_accuracy.png"]
    assert "| **mean** |" in capsys.readouterr().out


@pytest.mark.integration
def test_missing_quantize_output_names_the_stage(tiny_config):
    from refinery.evals import evaluate

    cfg = tiny_config(evaluate={"models": "[student_base, student_quant]"})
    with pytest.raises(FileNotFoundError, match=r"'student_quant' needs .*quantize/gptq.*run the quantize stage"):
        evaluate.run(cfg.context(), cfg.evaluate)
    assert not (cfg.context().run_dir / "evaluate" / "results.json").exists()
