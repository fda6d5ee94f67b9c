"""Shared-context scoring (evaluate.shared_context) vs lm-eval's HFLM: same model, items, process.

    python benchmarks/shared_context.py [MODEL_DIR] [ITEMS_PER_TASK]   # default: 4-layer tiny teacher, 20

Prints the wall time of each, their ratio, the largest per-request log-likelihood difference and
the per-task accuracies of both (riddle_sense, mmlu_dev, strategyqa held-out items).
"""
import sys
import tempfile
import time

import torch
from refinery.core.models import derive_student, smollm2_dir
from refinery.evals.lmeval_tasks import build_tasks, task_manager
from refinery.core.tasks import TasksConfig
import lm_eval
from lm_eval.models.huggingface import HFLM
from refinery.evals.shared_lm import SharedContextLM
from transformers import AutoModelForCausalLM, AutoTokenizer

TASKS_DIR = tempfile.mkdtemp(prefix="shared-context-")
path = sys.argv[1] if len(sys.argv) > 1 else str(derive_student(str(smollm2_dir()), 4))
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32); tok = AutoTokenizer.from_pretrained(path)
specs = build_tasks(TasksConfig(names=["riddle_sense", "mmlu_dev", "strategyqa"], eval_limit=int(sys.argv[2]) if len(sys.argv) > 2 else 20), TASKS_DIR)
tm = task_manager(specs, TASKS_DIR)
res = {}
for cls in (SharedContextLM, HFLM):
    t = time.time()
    r = lm_eval.simple_evaluate(model=cls(pretrained=m, tokenizer=tok, batch_size=16), tasks=[s.lm_eval_name for s in specs], task_manager=tm, log_samples=True)
    res[cls.__name__] = (r, time.time() - t)
a, b = res["SharedContextLM"][0]["samples"], res["HFLM"][0]["samples"]
diffs = []; same = 0; n = 0
for task in a:
    for sa, sb in zip(a[task], b[task]):
        for (la, ga), (lb, gb) in zip([x[0] for x in sa["resps"]], [x[0] for x in sb["resps"]]):
            diffs.append(abs(la - lb)); same += ga == gb; n += 1
w = {k: round(v[1], 1) for k, v in res.items()}
print(f"HFLM {w['HFLM']} s, shared {w['SharedContextLM']} s, ratio {w['SharedContextLM'] / w['HFLM']:.2f}; "
      f"max |d loglik| {max(diffs):.1e}; same greedy flag {same}/{n}")
for task in a: print(task, res["SharedContextLM"][0]["results"][task]["acc,none"], res["HFLM"][0]["results"][task]["acc,none"])
