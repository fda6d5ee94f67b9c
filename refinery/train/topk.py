"""Distillation from the `teacher-logits` stage's cached top-k logits (the teacher never loaded).

The teacher's distribution is known on its top k tokens only. Two ways to compare it with
the student's full distribution q (both at temperature T), per position, K = top-k indices:

- bucket: k + 1 classes, the top k and one "tail" class holding the rest. Teacher:
  p_i = (1 - p_tail) * softmax(values / T)_i and the cached p_tail (exact, computed from all
  logits when the cache was made). Student: q_i for i in K and q_tail = sum of q outside K,
  as log q_tail = logsumexp(s_j / T, j not in K) - logsumexp(s / T): no 1 - sum cancellation.
  With k = V there is no tail and this is the full KL exactly. Needs the cache made at the
  same T (the tail mass depends on it).
- renorm: both restricted to K and renormalized there (softmax over the k entries). The
  student is free outside K; any T works with the same cache.

Any divergence of losses.token_divergence (forward_kl, reverse_kl, jsd) applies to these
(k or k + 1)-class distributions; T^2 scaling and the alpha / CE mix are those of kd_loss.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from refinery.core.config import ConfigError
from refinery.train.losses import KDLoss, add_ce_grad_, rows_grad, rows_out, token_divergence
from refinery.train.teacher_logits import FORMAT, INDEX, ids_hash

log = logging.getLogger("refinery.train")
TAILS = ("bucket", "renorm")
MIN_LOG_TAIL = -80.0
"""Floor of the teacher's log tail mass (e^-80 ~ 2e-35): a tail that underflowed to 0 would make
reverse KL and JSD infinite; the floor changes forward KL by under 1e-33."""
RERUN = "re-run `refinery teacher-logits CONFIG` (with --force if it reports the stage complete)"


def _teacher_log_probs(t_values: Tensor, t_log_tail: Tensor | None, temperature: float, with_tail: bool) -> Tensor:
    """The teacher's log-probs over its top k, and over k + 1 classes (tail last) when `with_tail`."""
    t_top = F.log_softmax(t_values.float() / temperature, -1)
    if not with_tail:
        return t_top
    if t_log_tail is None or torch.isnan(t_log_tail).any():
        raise ValueError("distill.topk_tail=bucket needs the teacher's tail mass, which this cache lacks (vLLM "
                         "at temperature != 1): set distill.topk_tail=renorm, or rebuild the cache with "
                         "teacher_logits.engine=hf")
    t_tail = t_log_tail.float().clamp(MIN_LOG_TAIL, 0.0)[..., None]
    return torch.cat([t_top + torch.log(-torch.expm1(t_tail)), t_tail], -1)


def _check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"distill.topk_tail: got {tail!r}, expected one of {', '.join(TAILS)}")


def topk_log_probs(student_logits: Tensor, t_values: Tensor, t_indices: Tensor, t_log_tail: Tensor | None,
                   temperature: float, tail: str) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-probabilities over the k (renorm) or k + 1 (bucket) classes.

    student_logits (N, V); t_values (N, k) teacher logits of the top k (any per-row shift);
    t_indices (N, k) their token ids; t_log_tail (N,) log of the teacher's mass outside them at
    `temperature` (bucket only). With k = V bucket has no tail class.
    """
    _check_tail(tail)
    u = student_logits.float() / temperature
    idx = t_indices.long()
    with_tail = tail == "bucket" and idx.shape[-1] < u.shape[-1]
    teacher = _teacher_log_probs(t_values, t_log_tail, temperature, with_tail)
    s_top = u.gather(-1, idx)
    if tail == "renorm":
        return teacher, F.log_softmax(s_top, -1)
    lse = torch.logsumexp(u, -1, keepdim=True)
    if not with_tail:
        return teacher, s_top - lse
    s_tail = torch.logsumexp(u.scatter(-1, idx, float("-inf")), -1, keepdim=True)
    return teacher, torch.cat([s_top, s_tail], -1) - lse


def topk_kd_loss(student_logits: Tensor, t_values: Tensor | None, t_indices: Tensor | None,
                 t_log_tail: Tensor | None, labels: Tensor, mask: Tensor, alpha: float = 1.0,
                 temperature: float = 2.0, divergence: str = "forward_kl", jsd_beta: float = 0.5,
                 tail: str = "bucket", fused: bool = True) -> KDLoss:
    """alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE over masked-in tokens, teacher top-k only.

    student_logits (..., V); t_values, t_indices (..., k); t_log_tail, labels, mask (...). The
    teacher tensors may be None only when alpha == 0. See the module docstring for `tail`.
    forward_kl runs blockwise with a closed-form gradient (`fused`; False = plain autograd, for tests).
    """
    if not 0 <= alpha <= 1 or temperature <= 0:
        raise ValueError(f"topk_kd_loss: alpha must be in [0, 1] and temperature > 0, got {alpha}, {temperature}")
    _check_tail(tail)
    mask = mask.bool()
    if not mask.any():
        raise ValueError("topk_kd_loss: the mask selects no tokens (every example empty or padded out)")
    if t_values is not None and t_indices is not None:
        if t_values.shape != t_indices.shape or t_values.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(f"topk_kd_loss: teacher values {tuple(t_values.shape)}, indices "
                             f"{tuple(t_indices.shape)} and student logits {tuple(student_logits.shape)} do not line up")
        if divergence == "forward_kl" and fused:
            vocab, k = student_logits.shape[-1], t_values.shape[-1]
            rows = mask.reshape(-1).nonzero().squeeze(1)
            tails = t_log_tail.reshape(-1) if t_log_tail is not None else None
            per_row, kd, ce = _FusedTopkForwardKL.apply(
                student_logits.reshape(-1, vocab), t_values.reshape(-1, k), t_indices.reshape(-1, k), tails,
                labels.reshape(-1), rows, float(alpha), float(temperature), tail)
            return KDLoss(per_row.mean(), kd.mean(), ce.mean())
    s = student_logits[mask].float()
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1):  # alpha = 1: CE only logged
        ce = F.cross_entropy(s, labels[mask])
    if t_values is None or t_indices is None:
        if alpha > 0:
            raise ValueError("topk_kd_loss: no teacher top-k given but alpha > 0")
        return KDLoss(ce, torch.zeros_like(ce), ce)
    tail_sel = t_log_tail[mask] if t_log_tail is not None else None
    t_logp, s_logp = topk_log_probs(s, t_values[mask], t_indices[mask], tail_sel, temperature, tail)
    kd = token_divergence(t_logp, s_logp, divergence, jsd_beta).mean()
    return KDLoss(alpha * temperature ** 2 * kd + (1 - alpha) * ce, kd, ce)


class _FusedTopkForwardKL(torch.autograd.Function):
    """Per-token alpha*T^2*KL + (1-alpha)*CE against the top-k teacher, its parts, closed-form gradient.

    As losses._FusedForwardKL: blocks of rows read once, no vocab-sized autograd intermediates.
    With u = s/T, q = softmax(u), the gradient of KL in u is q - p~: p~ = the teacher's class
    probability on its top k; outside them (bucket) the teacher tail spread like the student's,
    p_tail * q_j / q_tail (renorm: 0 outside, and q renormalized over the top k).
    """

    @staticmethod
    def forward(ctx, s, t_values, t_indices, t_log_tail, labels, rows, alpha, temperature, tail):
        n, vocab = rows.numel(), s.shape[1]
        kd, ce = torch.empty(n, device=s.device), torch.empty(n, device=s.device)
        grad = torch.empty(n, vocab, dtype=s.dtype, device=s.device) if ctx.needs_input_grad[0] else None
        block = max(1, (1 << 20) // vocab)  # ~4 MB of floats per temporary
        for i in range(0, n, block):
            r = rows[i:i + block]
            sf, idx, lab = s[r].float(), t_indices[r].long(), labels[r]
            k = idx.shape[1]
            with_tail = tail == "bucket" and k < vocab
            t_cls = _teacher_log_probs(t_values[r], t_log_tail[r] if with_tail else None, temperature, with_tail)
            log_q = sf / temperature
            log_q -= torch.logsumexp(log_q, -1, keepdim=True)
            lq_top = log_q.gather(1, idx)
            if tail == "renorm":
                s_cls = F.log_softmax(lq_top, -1)
            elif with_tail:
                lq_tail = torch.logsumexp(log_q.scatter(1, idx, float("-inf")), -1, keepdim=True)
                s_cls = torch.cat([lq_top, lq_tail], -1)
            else:
                s_cls = lq_top
            p = t_cls.exp()
            kd[i:i + block] = torch.where(p > 0, p * (t_cls - s_cls), 0.0).sum(-1)  # 0 log 0 = 0
            lse = torch.logsumexp(sf, -1)
            ce[i:i + block] = lse - sf.gather(1, lab[:, None]).squeeze(1)
            if grad is not None:
                if tail == "renorm":
                    g = torch.zeros_like(log_q)
                else:  # outside the top k: q_j - p_tail * q_j / q_tail (both in log space, no underflow)
                    g = log_q.exp()
                    if with_tail:
                        g -= (log_q + (t_cls[:, -1:] - lq_tail)).exp_()
                g.scatter_(1, idx, s_cls[:, :k].exp() - p[:, :k])
                g.mul_(alpha * temperature)
                if alpha < 1:
                    add_ce_grad_(g, sf, lse, lab, 1 - alpha)
                grad[i:i + block] = g
        return rows_out(ctx, s.shape, kd, ce, grad, rows, alpha, temperature)

    @staticmethod
    def backward(ctx, g_row, _g_kd, _g_ce):
        return rows_grad(ctx, g_row), None, None, None, None, None, None, None, None


class TopkTeacher:
    """The teacher as its cached top-k logits: `kd_loss(...)` like refinery.train.teacher.Teacher.

    Checks, before any training, that the cache at `cache_dir` was made for exactly these token
    sequences (same data, tokenizer and max_seq_len) and, for the bucket tail, at the distill
    temperature; `expect` (the run's teacher_logits config, when the caller has it) also checks k.
    """

    def __init__(self, cache_dir: str | Path, seqs: list[list[int]], cfg, device: torch.device, expect=None):
        from safetensors import SafetensorError, safe_open

        self.dir, self.device, self.tail = Path(cache_dir), device, cfg.topk_tail
        path = self.dir / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: distill.teacher_source=topk trains from the teacher-logits "
                                    f"stage's cache; run `refinery teacher-logits CONFIG` first")
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{path} has format {index.get('format')}, this code reads {FORMAT}: {RERUN}")
        self._check(index, seqs, cfg, expect)
        self.k, self.vocab_size, self.examples = index["k"], index["vocab_size"], index["examples"]
        self.shards = []
        for s in index["shards"]:
            f = self.dir / s["file"]
            try:
                handle = safe_open(str(f), "pt")
                shape = handle.get_slice("values").get_shape()
            except (OSError, SafetensorError) as e:
                raise ValueError(f"teacher-logits shard {f} is missing or unreadable ({e}): {RERUN}") from e
            if list(shape) != [s["positions"], self.k]:
                raise ValueError(f"teacher-logits shard {f} holds values {shape}, index.json says "
                                 f"[{s['positions']}, {self.k}]: {RERUN}")
            self.shards.append(handle)
        size = sum(s["bytes"] for s in index["shards"])
        log.info("distill: teacher = top-%d logits cached in %s (%d examples, %.1f MiB, tail %s, engine %s)",
                 self.k, self.dir, len(self.examples), size / 2**20, self.tail, index["engine"])

    def _check(self, index: dict, seqs: list[list[int]], cfg, expect) -> None:
        where = f"the teacher-logits cache in {self.dir}"
        if index["max_seq_len"] != cfg.max_seq_len:
            raise ConfigError(f"{where} was made with teacher_logits.max_seq_len={index['max_seq_len']} but "
                             f"distill.max_seq_len={cfg.max_seq_len}: set teacher_logits.max_seq_len="
                             f"{cfg.max_seq_len} and {RERUN}")
        t = cfg.loss.temperature
        if cfg.topk_tail == "bucket" and cfg.loss.alpha > 0:
            if index["tail"] != "exact":
                raise ConfigError(f"{where} has no tail mass ({index['engine']} at temperature "
                                 f"{index['temperature']}): set distill.topk_tail=renorm, or set "
                                 f"teacher_logits.engine=hf and {RERUN}")
            if index["temperature"] != t:
                raise ConfigError(f"{where} holds the tail mass at teacher_logits.temperature={index['temperature']} "
                                 f"but distill.loss.temperature={t}: set teacher_logits.temperature={t} and "
                                 f"{RERUN} (or use distill.topk_tail=renorm, which any temperature serves)")
        if expect is not None and (index["k"], index["temperature"]) != (min(expect.k, index["vocab_size"]),
                                                                         expect.temperature):
            raise ConfigError(f"{where} has k={index['k']}, temperature={index['temperature']}; the config asks "
                             f"teacher_logits.k={expect.k}, temperature={expect.temperature}: {RERUN}")
        if len(seqs) != len(index["examples"]):
            raise ValueError(f"{where} holds {len(index['examples'])} examples, the training data has {len(seqs)} "
                             f"(the data changed since): {RERUN}")
        for i, (ids, e) in enumerate(zip(seqs, index["examples"])):
            if ids_hash(ids) != e["ids"]:
                raise ValueError(f"{where} was made for other tokens than training example {i} has (data, "
                                 f"tokenizer or max_seq_len changed): {RERUN}")

    def _example(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        e = self.examples[i]
        f, a, b = self.shards[e["shard"]], e["offset"], e["offset"] + e["positions"]
        return (f.get_slice("values")[a:b], f.get_slice("indices")[a:b], f.get_slice("log_tail")[a:b])

    def kd_loss(self, student_logits: Tensor, rows: list[int], ids: Tensor, attn: Tensor, labels: Tensor,
                mask: Tensor, loss_cfg) -> KDLoss:
        """The KD loss of the student's logits against the cached teacher on examples `rows`."""
        args = {"alpha": loss_cfg.alpha, "temperature": loss_cfg.temperature, "divergence": loss_cfg.divergence,
                "jsd_beta": loss_cfg.jsd_beta, "tail": self.tail}
        if loss_cfg.alpha == 0:
            return topk_kd_loss(student_logits, None, None, None, labels, mask, **args)
        if student_logits.shape[-1] != self.vocab_size:
            raise ValueError(f"the student has {student_logits.shape[-1]} output logits, the cached teacher "
                             f"{self.vocab_size}: they must share the tokenizer")
        (b, width), k = ids.shape, self.k
        values = torch.zeros(b, width, k)
        indices = torch.zeros(b, width, k, dtype=torch.long)
        log_tail = torch.zeros(b, width)
        have = torch.zeros(b, width, dtype=torch.bool)
        for j, i in enumerate(rows):
            v, ix, lt = self._example(int(i))
            n = len(lt)
            values[j, :n], indices[j, :n], log_tail[j, :n], have[j, :n] = v.float(), ix.long(), lt.float(), True
        if (mask.bool().cpu() & ~have).any():
            raise ValueError("TopkTeacher.kd_loss: the mask counts positions the cache has no teacher logits for "
                             "(it holds positions 0..n-2 of each n-token example, the next-token targets)")
        dev = student_logits.device
        return topk_kd_loss(student_logits, values.to(dev), indices.to(dev), log_tail.to(dev), labels, mask, **args)
