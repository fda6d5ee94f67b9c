"""Activation outliers per decoder layer: how far the largest activation stands above the typical one.

    stats = activation_stats(model, tokenizer, texts, max_len=256)
    # [{"layer": 0, "site": "residual", "max_abs": ..., "median_abs": ..., "ratio": ..., "kurtosis": ...}, ...]

The mechanism proposed for Muon's smaller quantization loss (REFERENCE.md: Muon-trained models have
fewer activation outliers) is measured here on held-out text, with forward hooks, in float:

- `residual`: the hidden state each decoder layer outputs (the residual stream);
- `<proj>_in`: the input of each linear layer of the block (q/k/v share the attention norm's output,
  so `q_proj_in` stands for the three; `o_proj_in`, `gate_proj_in` (= up_proj's), `down_proj_in`).

Per site: max |x| and median |x| over every token of every text (padding excluded) and channel,
their ratio, and the excess kurtosis of all values (0 for a Gaussian; large when a few channels
carry huge values). Inputs to GPTQ are what the quantized weights multiply, so `*_in` ratios are
the ones that matter for W4A16 error; the residual stream is where "massive activations" live.
"""
from __future__ import annotations

SITES = ("q_proj", "o_proj", "gate_proj", "down_proj")  # the distinct linear inputs of a Llama/Qwen2 block


class _Acc:
    """Running |x| statistics of one site; values kept as a sample for the median."""

    def __init__(self, keep: int = 200_000):
        self.keep = keep
        self.max_abs = 0.0
        self.n = 0
        self.s1 = self.s2 = self.s3 = self.s4 = 0.0
        self.sample: list = []

    def add(self, x) -> None:
        x = x.detach().float().reshape(-1)
        self.max_abs = max(self.max_abs, x.abs().max().item())
        self.n += x.numel()
        d = x.double()
        self.s1 += d.sum().item()
        self.s2 += (d * d).sum().item()
        self.s3 += (d ** 3).sum().item()
        self.s4 += (d ** 4).sum().item()
        step = max(1, x.numel() // max(1, self.keep // 16))
        self.sample.append(x.abs()[::step].clone())

    def result(self) -> dict:
        import torch

        med = torch.cat(self.sample).median().item() if self.sample else 0.0
        mean = self.s1 / self.n
        var = self.s2 / self.n - mean ** 2
        m4 = self.s4 / self.n - 4 * mean * self.s3 / self.n + 6 * mean ** 2 * self.s2 / self.n - 3 * mean ** 4
        kurt = m4 / var ** 2 - 3 if var > 0 else 0.0
        return {"max_abs": self.max_abs, "median_abs": med, "ratio": self.max_abs / med if med > 0 else float("inf"),
                "kurtosis": kurt, "values": self.n}


def decoder_layers(model):
    """The decoder blocks of a causal LM (Llama/Qwen2/Mistral layout: model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"activation_stats: {type(model).__name__} has no model.layers; only Llama-style "
                         "decoders (Llama, Qwen2, Mistral, SmolLM2) are supported")
    return layers


def activation_stats(model, tokenizer, texts: list[str], max_len: int = 256, batch_size: int = 8) -> list[dict]:
    """Per decoder layer and site: max_abs, median_abs, ratio, kurtosis (see the module docstring)."""
    import torch

    if not texts:
        raise ValueError("activation_stats: no texts given; pass held-out rows (e.g. generate/data.jsonl)")
    layers = decoder_layers(model)
    accs: dict[tuple[int, str], _Acc] = {}
    mask_now: dict = {}
    hooks = []

    def keep(key, t):
        m = mask_now.get("mask")
        accs.setdefault(key, _Acc()).add(t[m] if m is not None and t.shape[:2] == m.shape else t)

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(
            lambda mod, args, out, i=i: keep((i, "residual"), out[0] if isinstance(out, tuple) else out)))
        for name, mod in layer.named_modules():
            short = name.rsplit(".", 1)[-1]
            if short in SITES:
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, args, i=i, s=short: keep((i, f"{s}_in"), args[0])))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.no_grad():
            for b in range(0, len(texts), batch_size):
                enc = [tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts[b:b + batch_size]]
                width = max(len(e) for e in enc)
                ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=device)
                mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=device)
                mask_now["mask"] = mask.bool()
                model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return [{"layer": i, "site": s, **a.result()} for (i, s), a in sorted(accs.items())]


def plot_outliers(stats_by_model: dict[str, list[dict]], path, site: str = "residual") -> None:
    """Max/median ratio per layer (log scale), one line per model, for one site."""
    from refinery.evals.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, stats in stats_by_model.items():
        rows = [r for r in stats if r["site"] == site]
        ax.plot([r["layer"] for r in rows], [r["ratio"] for r in rows], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"max |x| / median |x| ({site})")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
