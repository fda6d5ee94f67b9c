"""SharedContextLM scores every request as lm-eval's HFLM does, from one pass per item's context."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    from refinery.core.tasks import TasksConfig
    from refinery.evals.lmeval_tasks import build_tasks, task_manager

    where = tmp_path_factory.mktemp("tasks")
    # 2, 4 and 5 choices; mmlu's contexts are long, riddle_sense's choices multi-token
    specs = build_tasks(TasksConfig(names=["strategyqa", "mmlu_dev", "riddle_sense"], eval_limit=12), where)
    return specs, task_manager(specs, where)


def _per_request(raw: dict) -> dict:
    return {(task, s["doc_id"], j): r[0] for task, rows in raw["samples"].items() for s in rows
            for j, r in enumerate(s["resps"])}


def test_same_loglikelihoods_and_greedy_flags_as_hflm(tiny_teacher, tiny_tasks):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.evals.scores import score_model

    specs, tm = tiny_tasks
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    # batch 5: items of different packed lengths share a padded batch
    shared = score_model(model, tok, specs, tm, batch_size=5, seed=0, shared_context=True)
    plain = score_model(model, tok, specs, tm, batch_size=5, seed=0, shared_context=False)
    a, b = _per_request(shared), _per_request(plain)
    assert a.keys() == b.keys() and len(a) == 12 * 2 + 12 * 4 + 12 * 5
    worst = max(abs(a[k][0] - b[k][0]) for k in a)
    assert worst < 2e-4, worst  # fp32: float rounding of another batch shape only
    assert [a[k][1] for k in a] == [b[k][1] for k in a]
    for spec in specs:
        assert shared["results"][spec.lm_eval_name]["acc,none"] == plain["results"][spec.lm_eval_name]["acc,none"]


def test_greedy_flag_and_contexts_longer_than_the_model(tiny_teacher):
    """A continuation made of the model's own greedy tokens is flagged greedy; an item longer than
    the model's max length goes through HFLM's own path; both agree with HFLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.evals.shared_lm import SharedContextLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    lm = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=24)
    ctx = tok("Question: " + "which one is heavier, " * 3 + "\nAnswer:").input_ids  # ~25 tokens
    reqs = [(("c", f" {w}"), ctx, tok(f" {w}").input_ids) for w in ("a stone", "a feather")]
    short = ctx[-6:]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([short]), max_new_tokens=2, do_sample=False)[0, len(short):].tolist()
    packed = [(("c2", " yes"), short, tok(" yes").input_ids), (("c2", "g"), short, greedy)]
    ours = lm._loglikelihood_tokens(reqs + packed, disable_tqdm=True)
    ref = super(SharedContextLM, lm)._loglikelihood_tokens(reqs + packed, disable_tqdm=True)
    for (la, ga), (lb, gb) in zip(ours, ref):
        assert abs(la - lb) < 2e-4 and ga == gb
    assert ours[-1][1] and not ours[-2][1]
