"""The planner's own configuration: the cluster and layout, the plan options, and the resolved ep."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..validation import above, at_least, check_finite, one_of

GiB = 2**30
ARCHITECTURES = ("decoder_only", "encoder_decoder")
OPTIMIZERS = {"adam": 12, "adafactor": 4, "sgd": 8}  # bytes/param with 16-bit weights
OPTIMIZERS_FP32 = {"adam": 8, "adafactor": 0, "sgd": 4}  # with fp32 weights (no master copy)


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
    """The machine and the parallel layout. Bandwidths in GB/s (1e9 bytes) per GPU per direction."""

    gpu: str = "A100-SXM4-80GB"  # the GPU model; its peak FLOP/s (moe_train.hardware) is shown
    world_size: int = 8
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # GiB
    reserved_gb: float = 2.0  # GiB: CUDA context, NCCL buffers, fragmentation
    intra_node_gbps: float = 150.0
    inter_node_gbps: float = 20.0
    tflops: float = 150.0  # achieved, per GPU
    ep: int | None = None  # None = largest divisor of num_experts that divides world_size
    zero_stage: int = 1
    micro_batch_size: int = 1
    grad_accum: int = 1
    seq_len: int | None = None  # None = model.seq_len
    activation_checkpointing: bool = False
    flash_attention: bool = False
    param_bytes: int = 2
    optimizer: str = "adam"

    def validate(self, num_experts: int) -> None:
        """Raise ValueError naming cluster.<field> for values no cluster has."""
        check_finite(self, "cluster")
        at_least(
            self, "cluster", 1, "world_size", "gpus_per_node", "micro_batch_size", "grad_accum"
        )
        at_least(self, "cluster", 1, "seq_len", optional=True)
        above(self, "cluster", 0, "gpu_memory_gb", "intra_node_gbps", "inter_node_gbps", "tflops")
        at_least(self, "cluster", 0, "reserved_gb")
        one_of(self, "cluster", "zero_stage", (0, 1, 2))
        one_of(self, "cluster", "param_bytes", (2, 4))  # bf16/fp16, fp32
        one_of(self, "cluster", "optimizer", OPTIMIZERS)
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
