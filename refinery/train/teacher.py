"""Teacher logits for the KD loss: live, or from final hidden states cached once.

The data is small and seen for several epochs, so running the teacher's whole body on every
step repeats the same work. With the cache, the body runs once over all examples at start
(its post-norm last hidden states are kept, `len x hidden` per example) and each step only
applies the lm_head: the same targets at about a third less compute per step for a
SmolLM2-sized teacher. The cache is used only when `lm_head(last hidden) == logits` holds
for this teacher (checked on real rows; false for models with logit soft-capping or
scaling) and when it fits in memory; otherwise the teacher runs live.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from refinery.train.data import collate
from refinery.train.losses import KDLoss, kd_loss

log = logging.getLogger("refinery.train")
MAX_CACHE_BYTES = 4 << 30


class Teacher:
    """`logits(rows, ids, attn)`: the frozen teacher's logits for a batch of example indices."""

    def __init__(self, model: torch.nn.Module, seqs: list[list[int]], pad_id: int, device: torch.device,
                 cache: bool, batch_size: int = 16):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.hidden: list[torch.Tensor] | None = None
        if cache:
            self.hidden = self._try_cache(seqs, batch_size)

    def _try_cache(self, seqs: list[list[int]], batch_size: int) -> list[torch.Tensor] | None:
        width = self.model.get_output_embeddings().weight.shape[1]
        dtype = next(self.model.parameters()).dtype
        need = sum(map(len, seqs)) * width * dtype.itemsize
        if need > MAX_CACHE_BYTES:
            log.info("teacher cache would take %.1f GiB: running the teacher live", need / 2**30)
            return None
        hidden = self._hidden_states(seqs, batch_size)
        err, scale, tv = self._check(seqs, hidden)
        if err > 0.01 * scale + 1e-3:
            log.warning("teacher logits are not lm_head(last hidden state) (max diff %.3g of %.3g): "
                        "running the teacher live", err, scale)
            return None
        if tv > 0.25:  # bf16 batch-composition noise measured up to 0.065; a padding or slicing fault is ~1
            log.warning("cached teacher distributions differ from the live ones (max total variation %.3g): "
                        "running the teacher live", tv)
            return None
        log.info("teacher: cached final hidden states of %d examples (%.0f MiB)", len(seqs), need / 2**20)
        return hidden

    @torch.no_grad()
    def _check(self, seqs: list[list[int]], hidden: list[torch.Tensor]) -> tuple[float, float, float]:
        """On the two longest rows: (max |logits - lm_head(last hidden)|, max |logits|), both taken from
        the same forward, so batch composition cannot enter it (a model that scales or soft-caps its
        logits differs by far more than rounding; hidden states from batches of other rows differ by
        up to 2.8% of the largest logit in bf16 on AMX, measured); and the max total variation between
        the live distributions and those from the cache (`hidden`), which catches padding or slicing
        faults of the cache itself."""
        probe = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))[:2]
        ids, attn = collate([seqs[i] for i in probe], self.pad_id)
        with self._capture() as captured:
            live = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
        same_forward = torch.nn.functional.linear(captured[-1], self.head_w, self.head_b)
        keep = attn.bool().to(self.device)
        live = live[keep].float()
        err = (live - same_forward[keep].float()).abs().max().item()
        cached = self._head([hidden[i] for i in probe], ids.shape[1])[keep].float()
        tv = 0.5 * (live.softmax(-1) - cached.softmax(-1)).abs().sum(-1).max().item()
        return err, live.abs().max().item(), tv

    @contextlib.contextmanager
    def _capture(self) -> Iterator[list[torch.Tensor]]:
        """The decoder body's post-norm output of each forward run inside, captured by a hook during a
        root forward: calling the body alone would skip the root's FSDP2 all-gather (embeddings live in
        the root unit)."""
        captured: list[torch.Tensor] = []
        hook = self.model.get_decoder().register_forward_hook(
            lambda mod, args, out: captured.append(out.last_hidden_state))
        try:
            yield captured
        finally:
            hook.remove()

    @torch.no_grad()
    def _hidden_states(self, seqs: list[list[int]], batch_size: int) -> list[torch.Tensor]:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        with self._capture() as captured:
            for k in range(0, len(order), batch_size):
                chunk = order[k:k + batch_size]
                ids, attn = collate([seqs[i] for i in chunk], self.pad_id)
                captured.clear()  # one batch's hidden states held at a time
                self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), logits_to_keep=1)
                for j, i in enumerate(chunk):
                    out[i] = captured[-1][j, :len(seqs[i])].clone()
        head = self.model.get_output_embeddings()
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 (FSDP2 shards)
        self.head_w = full(head.weight).detach()
        self.head_b = None if getattr(head, "bias", None) is None else full(head.bias).detach()
        return out

    def _head(self, hidden: list[torch.Tensor], width: int) -> torch.Tensor:
        h = torch.zeros(len(hidden), width, hidden[0].shape[-1], dtype=hidden[0].dtype, device=self.device)
        for j, x in enumerate(hidden):
            h[j, :len(x)] = x
        return torch.nn.functional.linear(h, self.head_w, self.head_b)

    def logits(self, rows: list[int], ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """(B, L, V) teacher logits for examples `rows`, padded like `ids` (pad positions arbitrary)."""
        if self.hidden is None:
            with torch.no_grad():
                return self.model(input_ids=ids, attention_mask=attn).logits
        return self._head([self.hidden[i] for i in rows], ids.shape[1])

    def kd_loss(self, student_logits: torch.Tensor, rows: list[int], ids: torch.Tensor, attn: torch.Tensor,
                labels: torch.Tensor, mask: torch.Tensor, loss_cfg) -> KDLoss:
        """The KD loss of the student's logits against this teacher on examples `rows` (see kd_loss)."""
        t_logits = self.logits(rows, ids, attn) if loss_cfg.alpha > 0 else None
        return kd_loss(student_logits, t_logits, labels, mask, loss_cfg.alpha, loss_cfg.temperature,
                       loss_cfg.divergence, loss_cfg.jsd_beta)
