"""Config of the `distill` stage: LoRA student trained on teacher logits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from refinery.core.config import check


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self):
        check(self.r >= 1, "r", self.r, "an integer >= 1")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        check(bool(self.targets), "targets", self.targets, "at least one module name")


@dataclass
class LossConfig:
    """loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE."""

    alpha: float = 1.0
    temperature: float = 2.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5

    def __post_init__(self):
        check(0 <= self.alpha <= 1, "alpha", self.alpha, "a number in [0, 1]")
        check(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        check(0 < self.jsd_beta < 1, "jsd_beta", self.jsd_beta, "a number in (0, 1)")


@dataclass
class OptimConfig:
    """Muon on 2-D matrices (LoRA A and B), AdamW on the rest; or AdamW everywhere."""

    name: Literal["muon", "adamw"] = "muon"
    lr: float = 0.02
    """Muon learning rate (for `adamw`, the AdamW learning rate)."""
    adamw_lr: float = 3e-4
    """AdamW learning rate for the params Muon does not take."""
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    weight_decay: float = 0.0
    lr_scale: Literal["original", "match_rms_adamw", "none"] = "original"
    """Muon per-shape LR rule: max(1, rows/cols)**0.5 (original), 0.2*sqrt(max(rows, cols)), or none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    grad_clip: float | None = 1.0

    def __post_init__(self):
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.adamw_lr > 0, "adamw_lr", self.adamw_lr, "a number > 0")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        check(self.ns_steps >= 1, "ns_steps", self.ns_steps, "an integer >= 1")
        check(len(self.betas) == 2, "betas", self.betas, "two numbers")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")


@dataclass
class ParallelConfig:
    """How many processes train and how the work and weights are split between them."""

    strategy: Literal["none", "ddp", "fsdp2", "deepspeed"] = "none"
    """none: one process. ddp: replicated weights, gradients all-reduced. fsdp2: torch `fully_shard`
    of student and teacher (frozen weights sharded). deepspeed: ZeRO-`zero_stage` via deepspeed.initialize."""
    nproc: int = 1
    """Processes on this node (`refinery distill --nproc N` sets it); torchrun is started for N > 1."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (2 or 3; 3 also shards the frozen weights). Only for strategy deepspeed."""
    timeout_s: int = 300
    """Collective timeout: a dead or stuck rank fails the job after this many seconds instead of hanging."""
    launcher: Literal["torchrun", "ray"] = "torchrun"
    """torchrun: N processes on this node. ray: a Ray Train TorchTrainer with N workers on the Ray cluster
    (the address in RAY_ADDRESS, else a local Ray), e.g. inside sweep trials."""

    nnodes: int = 1
    """Nodes in the job (`--nnodes N`); for N > 1 every node runs the same command and torchrun's c10d
    rendezvous joins them. run_dir must be on a filesystem every node sees at the same path."""
    node_rank: int = -1
    """This node's index (`--node-rank R`): 0 runs the stage, the others only join its workers.
    -1: SLURM_NODEID, else NODE_RANK from the environment."""
    rdzv_endpoint: str = ""
    """HOST:PORT of the rendezvous (node 0 hosts it). Empty: the first host of the Slurm allocation
    (port 29400), else MASTER_ADDR[:MASTER_PORT]."""
    interface: str = ""
    """Network interface for gloo/NCCL traffic between nodes (e.g. eth0, ib0), under torchrun (also this
    node's rendezvous address) and Ray Train alike. Empty: the libraries' defaults, which go by the
    hostname: where it resolves to a loopback address, ranks on other nodes cannot connect."""

    def __post_init__(self):
        check(self.nproc >= 1, "nproc", self.nproc, "an integer >= 1")
        check(self.nnodes >= 1, "nnodes", self.nnodes, "an integer >= 1")
        check(-1 <= self.node_rank < self.nnodes, "node_rank", self.node_rank,
              f"-1 (from Slurm or NODE_RANK) or 0..{self.nnodes - 1}")
        check(self.nnodes == 1 or self.launcher == "torchrun", "launcher", self.launcher,
              "torchrun when nnodes > 1 (with launcher=ray, Ray places the workers on its nodes itself)")
        check(self.zero_stage in (2, 3), "zero_stage", self.zero_stage, "2 or 3")
        check(self.timeout_s >= 10, "timeout_s", self.timeout_s, "an integer >= 10 (seconds)")
        check(self.nproc * self.nnodes == 1 or self.strategy != "none", "strategy", self.strategy,
              f"ddp, fsdp2 or deepspeed when nproc={self.nproc} x nnodes={self.nnodes} > 1")


@dataclass
class TeacherLogitsConfig:
    """The `teacher-logits` stage: the teacher's top-k logits over the training data, computed once."""

    k: int = 64
    """Logits kept per position (the rest is one tail bucket or dropped, see distill.topk_tail)."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """vllm (prompt logprobs) where installed, else transformers."""
    batch_size: int = 16
    """Sequences per teacher forward (hf): the (batch x len x vocab) logits of one batch are in memory."""
    rows_per_shard: int = 256
    """Examples per safetensors shard file (also the unit of work a killed run keeps)."""
    max_seq_len: int = 192
    """Must equal distill.max_seq_len: the data is tokenized and cut exactly as distill does (checked)."""
    temperature: float = 2.0
    """Must equal distill.loss.temperature for distill.topk_tail=bucket: the tail mass is stored at this
    temperature (checked). renorm does not use it."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the teacher's weights and activations."""
    value_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage of the top-k logits. They are kept minus the position's max (top 1 = 0), so the likely
    tokens sit near 0 where float16 is precise to ~5e-4 relative; bfloat16 has 8x coarser steps."""

    def __post_init__(self):
        check(self.k >= 1, "k", self.k, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, "an integer >= 1")
        check(self.max_seq_len >= 2, "max_seq_len", self.max_seq_len, "an integer >= 2")
        check(self.temperature > 0, "temperature", self.temperature, "a number > 0")


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The decoder's linear layers by type (what GPTQ quantizes in a Llama-style model)."""


@dataclass
class QatConfig:
    """KD-QAT (arXiv 2403.18159): the student's decoder linear weights (W + LoRA) are fake-quantized on
    the grid the export writes, gradients pass straight through; the teacher stays float."""

    enabled: bool = False
    bits: int = 4
    """Weight bits of the training grid (2-8); the GPTQ export (quantize.method=qat_rtn) packs 2, 4 or 8."""
    group_size: int = 64
    """Input columns per scale/zero (-1 = one group per output row); must divide every layer's input width."""
    symmetric: bool = True
    """Zero fixed at 2^(bits-1) (what vLLM's GPTQ kernels take); false = per-group min/max zero point."""
    freeze: list[str] = field(default_factory=list)
    """Projections trained not at all (no LoRA on them; their weights are still quantized).
    ov-freeze = [o_proj, v_proj]."""
    diag_every: int = 10
    """Record per-layer quantization error and per-projection gradient norms every this many steps (0 = off)."""
    full_finetune: bool = False
    """Train the decoder's linear weights themselves (held in float32) instead of LoRA, for small students;
    distill writes `distill/model/` (an HF checkpoint) instead of `distill/adapter/`, lora.* is unused."""

    def __post_init__(self):
        check(2 <= self.bits <= 8, "bits", self.bits, "an integer in 2..8")
        check(self.group_size == -1 or self.group_size >= 8, "group_size", self.group_size, "-1 or an integer >= 8")
        bad = [p for p in self.freeze if p not in PROJECTIONS]
        check(not bad, "freeze", self.freeze, f"names among {', '.join(PROJECTIONS)} (ov-freeze: [o_proj, v_proj])")
        check(self.diag_every >= 0, "diag_every", self.diag_every, "an integer >= 0 (0 = off)")


@dataclass
class DistillConfig:
    """Training of the LoRA student from the teacher's temperature-softened logits."""

    steps: int = 120
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 192
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the frozen weights and activations; LoRA weights and optimizer state stay float32."""
    teacher_cache: bool = True
    """Run the teacher body once over the data and keep its last hidden states (each step then only
    applies its lm_head): same targets, less compute. Falls back to the live teacher when it would
    not fit in memory or the teacher's logits are not lm_head(last hidden state)."""
    teacher_source: Literal["live", "topk"] = "live"
    """live: the teacher model runs in this job. topk: train from the `teacher-logits` stage's cached
    top-k logits; the teacher is never loaded (for teachers too large to hold next to the student)."""
    topk_tail: Literal["bucket", "renorm"] = "bucket"
    """With teacher_source topk: the probability mass outside the top k is one extra "tail" class
    (bucket) or dropped and the top k renormalized (renorm)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    """Quantization-aware training (off by default; see refinery/train/qat.py and docs/qat.md)."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "max_seq_len", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        if self.qat.enabled:
            check(not (self.qat.full_finetune and self.parallel.strategy == "deepspeed"), "qat.full_finetune", True,
                  "false under parallel.strategy=deepspeed (not supported; use ddp)")
            check(self.qat.full_finetune or self.lora.dropout == 0, "lora.dropout", self.lora.dropout,
                  "0 with qat.enabled (the LoRA update is quantized together with W, so x cannot be dropped "
                  "on the LoRA path alone)")
            train = PROJECTIONS if self.qat.full_finetune else self.lora.targets
            left = [t for t in train if t not in self.qat.freeze]
            check(bool(left), "qat.freeze", self.qat.freeze, f"fewer projections than {list(train)} (nothing would train)")
            check(not (self.parallel.strategy == "deepspeed" and self.parallel.zero_stage == 3), "qat.enabled",
                  True, "false under parallel.strategy=deepspeed with zero_stage=3 (ZeRO-3 gathers a layer's weights "
                  "only for its own forward, which QAT replaces); use zero_stage 2, ddp or fsdp2")


def hashed(section: dict) -> dict:
    """The distill section as it enters stage and resume hashes: `qat` only when enabled, so runs
    made before QAT existed keep their hashes (and a QAT run hashes differently from a plain one)."""
    if not section.get("qat", {}).get("enabled"):
        section = {k: v for k, v in section.items() if k != "qat"}
    return section


def distill_needs(cfg) -> tuple[str, ...]:
    """What distill reads beyond generate's data: the top-k cache when teacher_source=topk."""
    return ("teacher-logits",) if cfg.distill.teacher_source == "topk" else ()


def teacher_logits_wanted(cfg) -> bool:
    """The top-k cache is only made for a distill that trains from it."""
    return cfg.distill.teacher_source == "topk"
