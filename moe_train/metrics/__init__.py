"""Run metrics, written by rank 0: metrics.jsonl and its sinks, and what goes into a record.

    writer.py            MetricsWriter: metrics.jsonl, mirrored to the sinks
    read.py              read_metrics, truncate_metrics (resume), last_logged
    layers.py            moe_layer_metrics: load balance, drops, all-to-all bytes per MoE layer
    gpu.py               NVML memory, utilisation, temperature, power per rank (nvidia-ml-py)
    tensorboard_sink.py  TensorBoard events (when tensorboard is installed)
    wandb_sink.py        Weights & Biases (trainer.wandb)

The log cadence that fills the records (TrainLogger) is the loop's: moe_train.training.logger.
"""

from .gpu import gather_gpu_stats, gpu_stats
from .layers import moe_layer_metrics
from .read import last_logged, read_metrics, truncate_metrics
from .writer import MetricsWriter

__all__ = [
    "MetricsWriter",
    "gather_gpu_stats",
    "gpu_stats",
    "last_logged",
    "moe_layer_metrics",
    "read_metrics",
    "truncate_metrics",
]
