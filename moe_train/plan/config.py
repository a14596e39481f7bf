"""The planner's own configuration: the machine (ClusterConfig) and the plan options.

Everything about the training run itself (ep, FSDP, recompute, batch, precision, optimizer) is the
trainer's own TrainConfig, composed from the same config groups and overrides as `moe-train`
(moe_train.plan.options says which of its fields the plan reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..validation import above, at_least, check_finite, one_of

GiB = 2**30
ARCHITECTURES = ("decoder_only", "encoder_decoder")


@dataclass
class EncDecConfig:
    """How to count a T5-style encoder-decoder (Switch) from a ModelConfig."""

    encoder_layers: int | None = None  # null = model.n_layers // 2; the decoder gets the rest
    d_kv: int | None = None  # per-head width; null = d_model / n_heads (T5/Switch use 64)
    rms_norm: bool = True  # T5 RMSNorm: a scale, no bias (false: LayerNorm with bias)
    relative_buckets: int = 32  # T5 relative position bias: buckets x heads per stack
    tie_embeddings: bool = True  # shared input embedding / LM head

    def validate(self) -> None:
        """encoder_layers is checked against model.n_layers where it is used (params.py)."""
        section = "plan.encoder_decoder"
        check_finite(self, section)
        at_least(self, section, 1, "d_kv", optional=True)
        at_least(self, section, 0, "relative_buckets")


@dataclass
class PlanOptions:
    """What the plan shows and how it counts."""

    json: bool = False  # true: print one JSON object instead of the tables
    architecture: str = "decoder_only"  # decoder_only (what moe-train trains) | encoder_decoder
    # read only when architecture=encoder_decoder (T5/Switch counting)
    encoder_decoder: EncDecConfig = field(default_factory=EncDecConfig)
    meta_check: bool = True  # cross-check the count on the meta device (one rank's experts)
    compare_routers: bool = True  # the all-to-all / compute table for every router kind
    suggest: bool = True  # when it does not fit: search the trainer's options for what fits

    def validate(self) -> None:
        check_finite(self, "plan")
        one_of(self, "plan", "architecture", ARCHITECTURES)
        self.encoder_decoder.validate()


@dataclass
class ClusterConfig:
    """The machine: GPUs, their memory, links and speed. Bandwidths in GB/s (1e9 bytes) per GPU
    per direction. The training layout is the trainer's (parallel.*, trainer.*, optim)."""

    gpu: str = "A100-SXM4-80GB"  # the GPU model; the header shows its peak FLOP/s when known
    world_size: int = 8  # GPUs (torchrun / Slurm launch them; the trainer has no such field)
    gpus_per_node: int = 8  # GPUs per node (ep groups of consecutive ranks fill nodes first)
    gpu_memory_gb: float = 80.0  # GiB (2^30 bytes) per GPU
    reserved_gb: float = 2.0  # GiB per GPU: CUDA context, NCCL buffers, allocator fragmentation
    intra_node_gbps: float = 150.0  # GB/s per GPU per direction inside a node (achieved)
    inter_node_gbps: float = 20.0  # GB/s per GPU per direction across nodes (achieved)
    tflops: float = 150.0  # achieved TFLOP/s per GPU
    # true: the GPU's scaled_dot_product_attention runs a fused kernel (flash / memory-efficient)
    # that keeps no seq_len^2 scores; false counts them (torch's math kernel: an upper bound)
    flash_attention: bool = False

    def validate(self) -> None:
        """Raise ValueError naming cluster.<field> for values no cluster has."""
        check_finite(self, "cluster")
        at_least(self, "cluster", 1, "world_size", "gpus_per_node")
        above(self, "cluster", 0, "gpu_memory_gb", "intra_node_gbps", "inter_node_gbps", "tflops")
        at_least(self, "cluster", 0, "reserved_gb")


@dataclass
class PlannerConfig:
    """configs/plan.yaml's schema: the machine and the plan options (the training options are
    moe-train's own configs, composed beside it)."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # the machine (cluster=NAME)
    plan: PlanOptions = field(default_factory=PlanOptions)  # what the plan shows


def ep_choices(num_experts: int, world: int) -> list[int]:
    """Expert-parallel sizes that divide both the expert count and the world."""
    return [
        e for e in range(1, min(num_experts, world) + 1) if num_experts % e == 0 and world % e == 0
    ]
