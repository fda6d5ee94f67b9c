"""lm-eval's HF model with the context of a multiple-choice item run once for all its choices.

lm-eval's HFLM scores each (context, choice) request as its own sequence, so a question with k
choices runs its context k times, and the LM head runs over every position. `SharedContextLM`
packs one item into one sequence: the context, then each choice's tokens, every choice at the
position ids it would have alone and seeing only the context and itself (a block attention mask).
The head runs only where a continuation token is predicted. On the bundled tasks this runs 146k
tokens instead of 319k for all held-out items (Qwen2.5 tokenizer) and skips ~all head positions.

Same requests in, same (log-likelihood, is_greedy) out: tokenization, context/continuation split
and the empty-context prefix token are HFLM's own (`_encode_pair`, `loglikelihood`); only
`_loglikelihood_tokens` is replaced. Numbers equal HFLM's to float rounding (tested in fp32).
Items whose packed length exceeds the model's max length fall back to HFLM's path.
"""
from __future__ import annotations

from lm_eval.models.huggingface import HFLM


class SharedContextLM(HFLM):
    """HFLM whose loglikelihood runs each distinct context once per batch of its continuations."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        from tqdm import tqdm

        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        packed, fallback = [], []
        for ctx, idx in groups.items():
            length = len(ctx) + sum(len(requests[i][2]) - 1 for i in idx)
            (packed if length <= self.max_length and self._packable() else fallback).append((ctx, idx))
        out: list = [None] * len(requests)
        if fallback:
            idx = [i for _, ids in fallback for i in ids]
            for i, ans in zip(idx, super()._loglikelihood_tokens([requests[i] for i in idx], disable_tqdm, override_bs)):
                out[i] = ans
        packed.sort(key=lambda g: -(len(g[0]) + sum(len(requests[i][2]) for i in g[1])))  # longest first
        bs = int(override_bs or (self.batch_size if str(self.batch_size) != "auto" else 8))
        with tqdm(total=sum(len(ids) for _, ids in packed), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests (shared contexts)") as bar:
            for start in range(0, len(packed), bs):
                chunk = packed[start:start + bs]
                for (ctx, idx), answers in zip(chunk, self._score_packed(chunk, requests)):
                    for i, ans in zip(idx, answers):
                        out[i] = ans
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
                    bar.update(len(idx))
        return out

    def _packable(self) -> bool:
        """A causal LM whose logits are its output embedding of the decoder's last hidden state."""
        cfg = self.model.config
        return (self.backend == "causal" and self.model.get_output_embeddings() is not None
                and not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None)

    def _score_packed(self, chunk, requests) -> list[list[tuple[float, bool]]]:
        """One forward for a batch of items: [(logprob, is_greedy) per continuation] per item."""
        import torch

        seqs, positions, segments, reads = [], [], [], []
        for ctx, idx in chunk:
            toks, pos, seg = list(ctx), list(range(len(ctx))), [0] * len(ctx)
            item_reads = []  # per continuation: (row of the logits predicting each token, the tokens)
            for j, i in enumerate(idx, 1):
                cont = requests[i][2]
                rows = [len(ctx) - 1] + list(range(len(toks), len(toks) + len(cont) - 1))
                toks += cont[:-1]
                pos += range(len(ctx), len(ctx) + len(cont) - 1)
                seg += [j] * (len(cont) - 1)
                item_reads.append((rows, cont))
            seqs.append(toks)
            positions.append(pos)
            segments.append(seg)
            reads.append(item_reads)
        width = max(map(len, seqs))
        n = len(seqs)
        ids = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        pos_ids = torch.zeros((n, width), dtype=torch.long)
        seg_ids = torch.full((n, width), -1, dtype=torch.long)  # -1: padding
        for b, (t, p, s) in enumerate(zip(seqs, positions, segments)):
            ids[b, :len(t)], pos_ids[b, :len(p)], seg_ids[b, :len(s)] = torch.tensor(t), torch.tensor(p), torch.tensor(s)
        q, k = seg_ids[:, :, None], seg_ids[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        # a query sees the context (segment 0) and its own segment, causally; padding sees itself only
        allowed = causal & (k >= 0) & ((k == 0) | (k == q))
        allowed |= torch.eye(width, dtype=torch.bool)
        dtype = self.model.dtype
        mask = torch.zeros((n, 1, width, width), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
        dev = self.device
        with torch.no_grad():
            hidden = self.model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                      position_ids=pos_ids.to(dev)).last_hidden_state
            head = self.model.get_output_embeddings()
            results = []
            for b, item_reads in enumerate(reads):
                rows = sorted({r for rr, _ in item_reads for r in rr})
                where = {r: x for x, r in enumerate(rows)}
                logp = torch.log_softmax(head(hidden[b, rows]).float(), dim=-1)
                answers = []
                for rr, cont in item_reads:
                    sel = logp[[where[r] for r in rr]]
                    target = torch.tensor(cont, device=sel.device)
                    answers.append((float(sel.gather(1, target[:, None]).sum()), bool((sel.argmax(-1) == target).all())))
                results.append(answers)
        return results
