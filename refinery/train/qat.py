"""KD-QAT: the student's linear weights are fake-quantized while it learns from the float teacher.

    refinery run configs/quickstart.yaml distill.qat.enabled=true quantize.method=qat_rtn
    refinery run configs/quickstart.yaml distill.qat.enabled=true distill.qat.freeze=[o_proj,v_proj] \
        quantize.method=qat_rtn                                    # ov-freeze (arXiv 2403.18159)

Every linear layer of the decoder (q, k, v, o, gate, up, down: what GPTQ quantizes) computes
with Q(W + B A * scaling), Q = round-to-nearest on a group-wise grid (`quantize`/`dequantize`),
its gradient passed straight through (STE: dQ(W)/dW = I). The grid is the one the export
writes (`refinery/quantize/qat_export.py`): scales rounded to float16 as GPTQ stores them, a
symmetric zero of 2^(bits-1), an asymmetric zero in [1, 2^bits - 1] (GPTQ v1 stores zero - 1;
a group whose min/max zero would be 0 gets the range [-scale, max] instead). Nothing is clipped.
Frozen projections (`distill.qat.freeze`) get no LoRA, so only their fixed quantized weight is
used. With `full_finetune` the linear weights themselves train (float32), no LoRA. Diagnostics (every `diag_every` steps): each layer's relative quantization error and the
gradient norm reaching each quantized weight, in `distill/qat_diagnostics.jsonl` and two PNGs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from refinery.core.manifest import atomic_path
from refinery.train.config import PROJECTIONS

DIAGNOSTICS = "qat_diagnostics.jsonl"
SPEC = "qat.json"
_FP16_TINY = 6.2e-5  # smallest normal float16: scales below would lose precision when stored


def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True):
    """(q, scale, zero) of a (out, in) matrix on the group-wise RTN grid, groups along the input dim.

    q: int32 (out, in) in [0, 2^bits - 1]; scale: float32 (out, groups), each exactly a float16
    value; zero: int32 (out, groups). group_size -1 = one group per output row. w ~ scale * (q - zero).
    """
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    if in_f % g:
        raise ValueError(f"qat group_size {group_size} does not divide the input width {in_f}")
    qmax = 2 ** bits - 1
    x = w.detach().float().reshape(out_f, in_f // g, g)
    if symmetric:  # zero fixed at 2^(bits-1): the only zero vLLM's symmetric GPTQ kernels accept
        zero = torch.full(x.shape[:2], 2 ** (bits - 1), dtype=torch.int32, device=w.device)
        scale = x.abs().amax(-1) / (2 ** (bits - 1) - 1)
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        # GPTQ v1 stores zero - 1 in `bits` bits, so zero >= 1: where min/max would put it at 0 the
        # grid is stretched to [-scale, hi] instead of clipping the top step.
        scale = torch.where(-lo < 0.5 * scale, hi / (qmax - 1), scale)
    scale = scale.clamp(min=_FP16_TINY).half().float()  # the grid the float16 checkpoint can hold
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(1, qmax).to(torch.int32)
    q = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, qmax).to(torch.int32)
    return q.reshape(out_f, in_f), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 (out, in) weights scale * (q - zero) of `quantize`'s output."""
    out_f, in_f = q.shape
    g = in_f if group_size == -1 else group_size
    x = q.reshape(out_f, in_f // g, g).float() - zero[..., None].float()
    return (x * scale[..., None]).reshape(out_f, in_f)


def fake_quant(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> torch.Tensor:
    """dequantize(quantize(w)) in the forward, identity in the backward (straight-through estimator)."""
    wq = dequantize(*quantize(w, bits, group_size, symmetric), group_size)
    return w + (wq - w).detach()


def base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """The nn.Linear holding the frozen weight (peft LoRA layers keep it as `base_layer`)."""
    return module.base_layer if hasattr(module, "base_layer") else module


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded (DTensor) param: outside a forward, e.g. for the
    diagnostics (a collective: every rank calls it); inside one the params are already whole."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """float32 W + sum over active adapters of B A * scaling (W alone for a plain Linear)."""
    w = _full(base_linear(module).weight).float()
    for name in getattr(module, "active_adapters", ()):
        if name in getattr(module, "lora_A", {}):
            a, b = _full(module.lora_A[name].weight).float(), _full(module.lora_B[name].weight).float()
            w = w + (b @ a) * module.scaling[name]
    return w


def quant_targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name: module} of the decoder's linear layers (LoRA-wrapped or plain), lm_head excluded."""
    found = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(base_linear(m), torch.nn.Linear) \
                and ".layers." in f".{name}":
            found[name] = m
    if not found:
        raise ValueError("distill.qat: the student has no q/k/v/o/gate/up/down_proj linear layers to quantize")
    return found


def layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


@dataclass
class QatState:
    """The fake-quantized layers of one student and the diagnostics they collect."""

    bits: int
    group_size: int
    symmetric: bool
    diag_every: int
    modules: dict[str, torch.nn.Module]
    recording: bool = False
    grad_sq: dict[str, float] = field(default_factory=dict)

    def due(self, step: int) -> bool:
        return self.diag_every > 0 and (step % self.diag_every == 0 or step == 1)

    def forward(self, name: str, module: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        w = fake_quant(effective_weight(module), self.bits, self.group_size, self.symmetric)
        if self.recording and w.requires_grad:  # dL/dQ(W) = dL/dW under the STE: what the paper plots
            w.register_hook(lambda g, n=name: self._add_grad(n, g))
        return F.linear(x, w.to(x.dtype), base_linear(module).bias)

    def _add_grad(self, name: str, g: torch.Tensor) -> None:
        self.grad_sq[name] = self.grad_sq.get(name, 0.0) + float(g.float().pow(2).sum())

    @torch.no_grad()
    def rows(self, step: int) -> list[dict]:
        """One row per quantized layer: relative quantization error ||Q(W) - W|| / ||W|| of the
        current (post-step) weight, and the norm of the step's gradient on it (None when frozen)."""
        out = []
        for name, m in self.modules.items():
            w = effective_weight(m)
            err = (fake_quant(w, self.bits, self.group_size, self.symmetric) - w).norm() / w.norm().clamp(min=1e-12)
            g = self.grad_sq.get(name)
            out.append({"step": step, "layer": layer_index(name), "proj": name.rsplit(".", 1)[-1],
                        "quant_err": round(float(err), 6), "grad_norm": None if g is None else round(math.sqrt(g), 6)})
        self.grad_sq.clear()
        self.recording = False
        return out


def attach(model: torch.nn.Module, cfg) -> QatState:
    """Make every decoder linear layer of `model` (peft-wrapped or not) compute with fake-quantized
    weights; `cfg` is a QatConfig. Layers in cfg.freeze must have no trainable params (checked)."""
    modules = quant_targets(model)
    state = QatState(cfg.bits, cfg.group_size, cfg.symmetric, cfg.diag_every, modules)
    for name, m in modules.items():
        proj = name.rsplit(".", 1)[-1]
        if proj in cfg.freeze:
            trainable = [n for n, p in m.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(f"distill.qat.freeze: {name} is frozen but has trainable {trainable}")
        width = base_linear(m).in_features
        if cfg.group_size != -1 and width % cfg.group_size:
            raise ValueError(f"distill.qat.group_size: {cfg.group_size} does not divide the input width {width} "
                             f"of {name}; pick a divisor (e.g. 64 or 32 for SmolLM2) or -1")
        # An instance attribute wins over the class's forward: peft's LoRA path (base + B A x) is
        # replaced by one matmul with the quantized sum, so the LoRA update is quantized with W.
        m.forward = (lambda x, *a, _n=name, _m=m, **k: state.forward(_n, _m, x, *a, **k))
    return state


def prepare_full_finetune(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Full fine-tuning: every decoder linear weight not in cfg.freeze becomes a trainable float32
    Parameter (Muon takes it); everything else (embeddings, norms, frozen projections) is frozen."""
    model.requires_grad_(False)
    for name, m in quant_targets(model).items():
        if name.rsplit(".", 1)[-1] not in cfg.freeze:
            m.weight = torch.nn.Parameter(m.weight.detach().float(), requires_grad=True)
    return model


def write_spec(path: Path, cfg, dtype: str) -> None:
    """distill/qat.json: the grid the export must use, and the dtype the frozen weights trained in."""
    spec = {"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
            "freeze": list(cfg.freeze), "dtype": dtype}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(spec, indent=2) + "\n")


def plot_diagnostics(rows: list[dict], out_dir: Path) -> list[str]:
    """qat_quant_error.png (per layer, last recorded step) and qat_grad_norm.png (per projection type
    over steps, mean over layers). Returns the files written."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    last = max(r["step"] for r in rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for proj in PROJECTIONS:
        pts = sorted((r["layer"], r["quant_err"]) for r in rows if r["step"] == last and r["proj"] == proj)
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=proj)
        steps = sorted({r["step"] for r in rows if r["proj"] == proj and r["grad_norm"] is not None})
        means = [sum(r["grad_norm"] for r in rows if r["step"] == s and r["proj"] == proj and r["grad_norm"] is not None)
                 / max(1, sum(1 for r in rows if r["step"] == s and r["proj"] == proj and r["grad_norm"] is not None))
                 for s in steps]
        if steps:
            ax2.plot(steps, means, marker=".", label=proj)
    ax1.set(xlabel="decoder layer", ylabel="||Q(W) - W|| / ||W||", title=f"quantization error (step {last})")
    ax2.set(xlabel="step", ylabel="||dL/dW|| (mean over layers)", title="gradient norm per projection", yscale="log")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    written = []
    for name, ax in (("qat_quant_error.png", ax1), ("qat_grad_norm.png", ax2)):
        extent = ax.get_tightbbox(fig.canvas.get_renderer()).transformed(fig.dpi_scale_trans.inverted())
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches=extent.expanded(1.02, 1.04), format="png")
        written.append(name)
    plt.close(fig)
    return written
