"""The planner's own configuration: the cluster and layout, the plan options, and the resolved ep."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..validation import above, at_least, check_finite, one_of

GiB = 2**30
ARCHITECTURES = ("decoder_only", "encoder_decoder")
# optimizer-state bytes per parameter in the trainer (fp32 weights and gradients are 4 + 4 more):
# AdamW two fp32 moments; Adafactor only factored statistics (a row and a column per matrix,
# about 4 (r + c) bytes per r x c matrix: counted exactly in state_bytes_per_gpu, as 0 here)
OPTIMIZERS = {"adamw": 8, "adafactor": 0}
CHECKPOINTING = ("none", "moe", "full")  # trainer.activation_checkpointing, cheapest first
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # trainer.precision (auto: 16-bit on a GPU)
# the trainer option each searched ClusterConfig field stands for (suggestions name these)
TRAINER_OPTIONS = {
    "world_size": "cluster.world_size",  # the GPUs torchrun / Slurm launch
    "ep": "parallel.ep",
    "fsdp": "parallel.fsdp",
    "reshard_after_forward": "parallel.reshard_after_forward",
    "activation_checkpointing": "trainer.activation_checkpointing",
    "micro_batch_size": "trainer.micro_batch_size",
    "optimizer": "optim",
}


@dataclass
class EncDecConfig:
    """How to count a T5-style encoder-decoder (Switch) from a ModelConfig."""

    encoder_layers: int | None = None  # None = n_layers // 2; the decoder gets the rest
    d_kv: int | None = None  # per-head width; None = d_model / n_heads
    rms_norm: bool = True  # scale only (T5); False = LayerNorm with bias
    relative_buckets: int = 32  # relative position bias: buckets x heads per stack
    tie_embeddings: bool = True

    def validate(self) -> None:
        """encoder_layers is checked against model.n_layers where it is used (params.py)."""
        section = "plan.encoder_decoder"
        check_finite(self, section)
        at_least(self, section, 1, "d_kv", optional=True)
        at_least(self, section, 0, "relative_buckets")


@dataclass
class PlanOptions:
    json: bool = False
    architecture: str = "decoder_only"  # decoder_only | encoder_decoder
    encoder_decoder: EncDecConfig = field(default_factory=EncDecConfig)
    meta_check: bool = True
    compare_routers: bool = True
    suggest: bool = True

    def validate(self) -> None:
        check_finite(self, "plan")
        one_of(self, "plan", "architecture", ARCHITECTURES)
        self.encoder_decoder.validate()


@dataclass
class ClusterConfig:
    """The machine and the parallel layout. Bandwidths in GB/s (1e9 bytes) per GPU per direction.

    The trainer's own options are read from the training config groups by the command line
    (plan_from_config): ep from parallel.ep (when > 1; else cluster.ep, else the largest that
    fits), fsdp and reshard_after_forward from parallel.*, activation_checkpointing and precision
    from trainer.*, optimizer from optim (optim.name). See TRAINER_OPTIONS."""

    gpu: str = "A100-SXM4-80GB"  # the GPU model; its peak FLOP/s (moe_train.hardware) is shown
    world_size: int = 8
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # GiB
    reserved_gb: float = 2.0  # GiB: CUDA context, NCCL buffers, fragmentation
    intra_node_gbps: float = 150.0
    inter_node_gbps: float = 20.0
    tflops: float = 150.0  # achieved, per GPU
    ep: int | None = None  # None = largest divisor of num_experts that divides world_size
    micro_batch_size: int = 1
    grad_accum: int = 1
    seq_len: int | None = None  # None = model.seq_len
    flash_attention: bool = False
    # the trainer's options (filled from parallel.*, trainer.*, optim by the command line)
    fsdp: bool = False
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"
    precision: str = "auto"
    optimizer: str = "adamw"
    engine: str = "native"  # trainer.engine: native | deepspeed
    zero_stage: int = 1  # trainer.zero_stage (deepspeed engine only)

    @property
    def compute_bytes(self) -> int:
        """Bytes of an activation / gathered weight in compute precision (auto: 16-bit)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def sharded(self) -> bool:
        """FSDP shards only with more than one rank (one process trains unsharded)."""
        return self.fsdp and self.world_size > 1

    def validate(self, num_experts: int) -> None:
        """Raise ValueError naming cluster.<field> for values no cluster has."""
        check_finite(self, "cluster")
        at_least(
            self, "cluster", 1, "world_size", "gpus_per_node", "micro_batch_size", "grad_accum"
        )
        at_least(self, "cluster", 1, "seq_len", optional=True)
        above(self, "cluster", 0, "gpu_memory_gb", "intra_node_gbps", "inter_node_gbps", "tflops")
        at_least(self, "cluster", 0, "reserved_gb")
        one_of(self, "trainer", "activation_checkpointing", CHECKPOINTING)
        one_of(self, "trainer", "precision", PRECISIONS)
        one_of(self, "trainer", "engine", ("native", "deepspeed"))
        one_of(self, "trainer", "zero_stage", (0, 1, 2))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optim.name: got {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}"
            )
        ep = self.ep
        if ep is not None and (ep < 1 or num_experts % ep or self.world_size % ep):
            raise ValueError(
                f"cluster.ep: ep={ep} must divide both num_experts={num_experts} and world_size="
                f"{self.world_size}; choose among {ep_choices(num_experts, self.world_size)}"
            )


def ep_choices(num_experts: int, world: int) -> list[int]:
    """Expert-parallel sizes that divide both the expert count and the world."""
    return [
        e for e in range(1, min(num_experts, world) + 1) if num_experts % e == 0 and world % e == 0
    ]


def resolve_ep(cluster: ClusterConfig, num_experts: int) -> ClusterConfig:
    """The cluster with ep set: as given, or the largest that divides experts and world."""
    if cluster.ep is not None:
        return cluster
    return replace(cluster, ep=max(ep_choices(num_experts, cluster.world_size)))
