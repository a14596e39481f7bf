"""The per-MoE-layer fields of a record: load balance, drops and all-to-all bytes."""

from __future__ import annotations


def moe_layer_metrics(layers) -> dict[str, float]:
    """Per-MoE-layer load balance, drops and all-to-all bytes of the last forward."""
    out: dict[str, float] = {}
    for i, layer in enumerate(layers):
        for key in (
            "load_cv",
            "load_min",
            "load_max",
            "dropped_frac",
            "send_bytes",
            "recv_bytes",
            "bias_min",
            "bias_max",
        ):
            if key in layer.last_stats:
                out[f"moe{i}/{key}"] = layer.last_stats[key]
    return out
