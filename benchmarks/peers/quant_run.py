"""One side of benchmarks/peers/quantize_vs_llmcompressor.py, run as its own process (peak RSS is its own).

    python quant_run.py quantize --tool ours|ours-rtn|ours-awq|llmcompressor --model MERGED --texts T.json --out DIR
    python quant_run.py quality --model MERGED --quant DIR --texts T.json --out M.json [--loader refinery|hf]

`ours*` run in our venv (GPTQModel 7.6 through refinery.quantize.gptq, the quantize stage's own code);
`llmcompressor` runs in its venv (peer_env.py) and imports nothing of ours. T.json holds
{"calibration": [...], "held_out": [...]} texts. Settings on both sides: 4 bits, symmetric, group
size 64, damping 0.05, calibration texts cut at 256 tokens, 8 per forward in the given order,
bf16 weights left unquantized, lm_head not quantized. Column order differs by design of each tool:
ours is GPTQModel's group-aware reordering (`act_group_aware`, the quantize stage's act_order),
llm-compressor's `actorder="static"` is its weight-order alias; both keep static groups (vLLM-loadable).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BITS, GROUP, DAMP, MAX_LEN, BATCH = 4, 64, 0.05, 256, 8


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--tool", required=True, choices=["ours", "ours-rtn", "ours-awq", "llmcompressor"])
    for name in ("--model", "--texts", "--out"):
        q.add_argument(name, required=True)
    m = sub.add_parser("quality")
    for name in ("--model", "--quant", "--texts", "--out"):
        m.add_argument(name, required=True)
    m.add_argument("--loader", choices=["refinery", "hf"], default="hf")
    return p.parse_args(argv)


def ours(model: str, out: str, calib: list[str], method: str) -> dict:
    from refinery.quantize.config import QuantizeConfig
    from refinery.quantize.gptq import quantize_model

    cfg = QuantizeConfig(method=method, bits=BITS, group_size=GROUP, act_order=True, damp_percent=DAMP,
                         calibration_samples=len(calib), calibration_max_len=MAX_LEN, calibration_batch_size=BATCH)
    stats = quantize_model(model, out, cfg, calib)
    return {"quantize_s": stats["quantize_s"]}


def ours_awq(model: str, out: str, calib: list[str]) -> dict:
    """AWQ through GPTQModel 7.6 (its own AWQ path; refinery has no quantize.method=awq)."""
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.quantization import FORMAT, METHOD, QuantizeConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    data = [dict(tok(t, truncation=True, max_length=MAX_LEN)) for t in calib]
    t0 = time.time()
    m = GPTQModel.load(model, QuantizeConfig(bits=BITS, group_size=GROUP, quant_method=METHOD.AWQ, format=FORMAT.GEMM),
                       dtype=torch.bfloat16)
    m.quantize(data, tokenizer=tok, batch_size=BATCH, calibration_data_min_length=1)
    m.save(out)
    return {"quantize_s": round(time.time() - t0, 2)}


def llmcompressor(model: str, out: str, calib: list[str]) -> dict:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    enc = [tok(t, truncation=True, max_length=MAX_LEN) for t in calib]
    ds = Dataset.from_dict({"input_ids": [list(e["input_ids"]) for e in enc],
                            "attention_mask": [list(e["attention_mask"]) for e in enc]})
    weights = QuantizationArgs(num_bits=BITS, type="int", symmetric=True, strategy="group", group_size=GROUP)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=DAMP, actorder="static")
    t0 = time.time()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    oneshot(model=m, dataset=ds, recipe=recipe, max_seq_length=MAX_LEN, num_calibration_samples=len(calib),
            batch_size=BATCH, shuffle_calibration_samples=False)  # our order, as GPTQModel gets it
    m.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    return {"quantize_s": round(time.time() - t0, 2)}


def quality(model: str, quant: str, texts: list[str], loader: str) -> dict:
    """KL(fp || quantized) per token and both perplexities on held-out texts (bf16 compute)."""
    import math

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = [tok(t, truncation=True, max_length=MAX_LEN)["input_ids"] for t in texts]

    @torch.no_grad()
    def logprobs(m):
        return [F.log_softmax(m(torch.tensor([x])).logits[0, :-1].float(), -1) for x in ids]

    fp = logprobs(AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval())
    if loader == "refinery":
        from refinery.evals.loading import load_model

        qm = load_model(quant, dtype="bfloat16")[0]
    else:
        qm = AutoModelForCausalLM.from_pretrained(quant, dtype=torch.bfloat16)
    q = logprobs(qm.eval())
    n = sum(len(x) - 1 for x in ids)
    kl = sum(F.kl_div(b, a, log_target=True, reduction="sum").item() for a, b in zip(fp, q)) / n

    def nll(lps):
        return sum(-lp[range(len(x) - 1), x[1:]].sum().item() for lp, x in zip(lps, ids)) / n

    return {"kl_mean": kl, "ppl_fp": math.exp(nll(fp)), "ppl_quant": math.exp(nll(q)), "tokens": n}


def main(argv=None) -> None:
    args = parse(argv)
    texts = json.loads(Path(args.texts).read_text())
    if args.cmd == "quality":
        res = quality(args.model, args.quant, texts["held_out"], args.loader)
    elif args.tool == "llmcompressor":
        res = llmcompressor(args.model, args.out, texts["calibration"])
    elif args.tool == "ours-awq":
        res = ours_awq(args.model, args.out, texts["calibration"])
    else:
        res = ours(args.model, args.out, texts["calibration"], "rtn" if args.tool == "ours-rtn" else "gptq")
    print("RESULT " + json.dumps(res), flush=True)
    if args.cmd == "quality":
        Path(args.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
