"""The planner plans only what the trainer does: M6-T 1T on 480 V100-32GB says which trainer
options fit (and why AdamW cannot), and every option it names composes into a valid training
config."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_train.config import CONFIG_DIR, TrainConfig, register_configs
from moe_train.plan import ClusterConfig, PlanOptions, largest_ep, make_plan
from moe_train.routing import RouterConfig
from tests.helpers.plan import model_cfg

V100 = {"gpu_memory_gb": 32, "gpus_per_node": 8, "intra_node_gbps": 50, "inter_node_gbps": 1.5,
        "tflops": 50}  # fmt: skip


def _m6t_plan() -> dict:
    cluster = ClusterConfig(world_size=480, **V100)
    router = RouterConfig(kind="prototype", top_k=2)
    options = PlanOptions(meta_check=False, compare_routers=False)
    cfg = TrainConfig(model=model_cfg("m6t_1t"), router=router)
    cfg.trainer.global_batch_size = 480  # one sequence per GPU
    cfg.parallel.ep = largest_ep(cfg, 480)  # no parallel.ep given
    return make_plan(cfg, cluster, options)


def test_m6t_on_480_v100_fits_with_adafactor_not_adamw() -> None:
    plan = _m6t_plan()
    assert not plan["fits"]  # AdamW: 16 bytes per parameter do not fit whatever the sharding
    assert plan["state_floor_bytes_per_gpu"] > 30 * 2**30
    assert plan["suggestion"]["cluster"]["world_size"] > 480
    same = plan["suggestion_same_gpus"]
    assert same["cluster"]["world_size"] == 480 and same["margin_bytes"] >= 0
    assert "optim=adafactor" in same["options"] and "parallel.ep=480" in same["options"]
    assert isinstance(plan["state_bytes_per_gpu"], int)


def test_every_suggested_option_is_a_trainer_option() -> None:
    plan = _m6t_plan()
    suggested = [plan["suggestion_same_gpus"], *plan["suggestions"]]
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        for s in suggested:
            overrides = [o for o in s["options"] if not o.startswith("cluster.")]
            cfg = compose("train", overrides=["model=m6t_1t", "router=prototype", *overrides])
            train_cfg: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
            train_cfg.validate()
