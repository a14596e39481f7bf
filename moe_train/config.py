"""The training configuration: one dataclass per Hydra config group, composed by TrainConfig.

Every field has a type and a default; Hydra's ConfigStore holds the schema, so a misspelt key or a
wrong type fails at start naming the key. `TrainConfig.validate` does the semantic checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from hydra.core.config_store import ConfigStore

from .data.config import DataConfig
from .model import ModelConfig
from .parallel import ParallelConfig
from .precision import PRECISIONS
from .routing import RouterConfig
from .training.host_memory import HOST_MEMORY
from .training.stop import parse_duration, signal_numbers
from .validation import above, at_least, check_finite, in_range, one_of

# configs/ at the repo root (editable install); absolute, so console scripts find it from any folder
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
OPTIM_IMPLS = ("torch", "apex")
OPTIMIZERS = ("adamw", "adafactor")
ENGINES = ("native", "deepspeed")
ZERO_STAGES = (0, 1, 2)
CHECKPOINTING = ("none", "moe", "full")  # moe_train.parallel.recompute.MODES
COMPILE = ("none", "blocks")  # moe_train.parallel.compile.COMPILE_MODES


@dataclass
class TrainModelConfig(ModelConfig):
    """ModelConfig as the trainer reads it: vocab_size null = the data's vocabulary, rounded up
    to a multiple of 64 (filled in at start; the run's config.yaml holds the number)."""

    # (the type checker's ignore: this widens ModelConfig's int; start-up fills the number in)
    vocab_size: int | None = None  # type: ignore[assignment]  # null = the data's vocabulary rounded up to a multiple of 64
    # a Hugging Face folder (Mixtral / Qwen3-MoE / Qwen2-MoE, safetensors) to start from: sets the model and router fields from its config.json and the weights from its tensors (docs/HF.md); null = random init
    init_from: str | None = None

    def validate(self) -> None:
        at_least(self, "model", 1, "vocab_size", optional=True)
        ModelConfig.validate(replace(self, vocab_size=self.vocab_size or 1))


@dataclass
class OptimConfig:
    """AdamW or Adafactor with linear warmup and cosine decay to min_lr_ratio * lr (lr is a
    function of step). Adafactor (optim=adafactor, moe_train/training/adafactor.py) keeps
    factored second moments (a row and a column vector per matrix, per expert) and no first
    moment; its step is relative: min(lr, 1/sqrt(t)) times the weight's RMS."""

    name: str = "adamw"  # adamw | adafactor
    impl: str = "torch"  # torch (fused/foreach AdamW) | apex (FusedAdam, needs NVIDIA apex)
    lr: float = 2e-3  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1  # the cosine decays to min_lr_ratio * lr at trainer.max_steps
    warmup_steps: int = 20  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only, not norms/biases)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # global norm across ranks; <= 0 disables clipping
    beta2_decay: float = -0.8  # adafactor: beta2_t = 1 - t^beta2_decay

    def validate(self) -> None:
        check_finite(self, "optim")
        one_of(self, "optim", "name", OPTIMIZERS)
        one_of(self, "optim", "impl", OPTIM_IMPLS)
        if self.name == "adafactor" and self.impl != "torch":
            raise ValueError(
                "optim.impl: adafactor has only the torch implementation; use optim.impl=torch"
            )
        if self.beta2_decay > 0:
            raise ValueError(f"optim.beta2_decay: must be <= 0, got {self.beta2_decay}")
        above(self, "optim", 0, "lr")
        in_range(self, "optim", 0, 1, "min_lr_ratio", high_inclusive=True)
        at_least(self, "optim", 0, "warmup_steps", "weight_decay", "eps")
        in_range(self, "optim", 0, 1, "beta1", "beta2")


@dataclass
class TrainerConfig:
    """The loop. global_batch_size sequences per step, split over all ranks and micro-batches."""

    max_steps: int = 1000  # optimizer steps to train for (a resumed run stops here too)
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks
    # sequences per rank per micro-step; None = global_batch_size / world (no accumulation)
    micro_batch_size: int | None = None
    # auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    precision: str = "auto"
    engine: str = "native"  # native | deepspeed
    zero_stage: int = 1  # deepspeed engine only: ZeRO stage (0, 1, 2; 1 or 2 with parallel.ep > 1)
    # none | moe (recompute the expert FFNs) | full (recompute every block); non-reentrant
    activation_checkpointing: str = "none"
    # none (eager) | blocks (torch.compile each Transformer block, as torchtitan; native engine)
    compile: str = "none"
    log_every: int = 10  # steps between metrics records (metrics.jsonl, the progress bar)
    eval_every: int = 200  # steps between validation losses (and at the last step)
    eval_batches: int = 8  # validation batches of global_batch_size windows; 0 = no validation
    ckpt_every: int = 200  # steps between checkpoints (and at the last step)
    keep_checkpoints: int = 2  # newest checkpoints kept in run_dir
    async_checkpoint: bool = False  # write checkpoints in the background (DCP, own gloo group)
    run_dir: str = "runs/default"  # the run folder: config.yaml, metrics.jsonl, checkpoints
    resume: bool = True  # continue from run_dir's latest checkpoint when there is one
    # rank 0 shows progress: a bar (loss, step time, tokens/s, MFU on GPUs) when stdout is a
    # terminal, else one plain line per log_every step with what metrics.jsonl records
    progress: bool = True
    tensorboard: bool = True  # when tensorboard is installed
    wandb: bool = False  # also log to Weights & Biases (needs wandb; WANDB_MODE=offline works)
    wandb_project: str = "moe-train"  # the W&B project
    wandb_run_name: str | None = None  # the W&B run name; null = the run folder's name
    print_config: bool = True  # print the resolved configuration at start (one compact block)
    threads: int | None = None  # torch CPU threads per rank; None = torch's default
    # reuse (glibc keeps freed host blocks for the next step: no fresh-page faults, +30-40 %
    # tokens/s training model=base on CPU) | release (the C library's default)
    host_memory: str = "reuse"
    # stop with an error after this many consecutive skipped steps (non-finite loss or
    # gradients: the run diverged); None = never stop. fp16 skips a few while its scale settles
    max_skipped_steps: int | None = 50
    # signals that stop the run after the current step with a checkpoint of it, exit status 75
    # (Slurm's --signal, preemption, scancel, Ctrl-C); [] = the signals' default actions
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    # wall-clock limit ("3h50m", "90m" or seconds) from the start of the run: stop in time to
    # save (one more step and 1.5 x the slowest save must fit) and exit 75; null = none
    time_limit: str | None = None
    # seconds a step (eval, save) may go without progress before every rank writes its stack
    # and the report names the ranks behind, then exits 124; null = 300 s above the slowest
    # of its kind seen (900 s for the first); 0 = no watchdog
    stall_timeout_s: float | None = None

    def validate(self) -> None:
        check_finite(self, "trainer")
        one_of(self, "trainer", "precision", PRECISIONS)
        one_of(self, "trainer", "engine", ENGINES)
        one_of(self, "trainer", "zero_stage", ZERO_STAGES)
        one_of(self, "trainer", "activation_checkpointing", CHECKPOINTING)
        one_of(self, "trainer", "compile", COMPILE)
        one_of(self, "trainer", "host_memory", HOST_MEMORY)
        if self.compile != "none" and self.engine != "native":
            raise ValueError(
                f"trainer.compile={self.compile} compiles the native engine's blocks; with "
                f"trainer.engine={self.engine} set trainer.compile=none"
            )
        at_least(self, "trainer", 1, "max_steps", "global_batch_size", "log_every", "eval_every")
        at_least(self, "trainer", 1, "ckpt_every", "keep_checkpoints")
        at_least(self, "trainer", 0, "eval_batches")
        at_least(self, "trainer", 1, "micro_batch_size", "threads", optional=True)
        at_least(self, "trainer", 1, "max_skipped_steps", optional=True)
        at_least(self, "trainer", 0, "stall_timeout_s", optional=True)
        signal_numbers(self.stop_signals)
        if self.time_limit is not None:
            parse_duration(self.time_limit)

    def batch_split(self, data_world: int) -> tuple[int, int]:
        """(micro_batch_size, grad_accum) per rank so that world * micro * accum == global batch."""
        B = self.global_batch_size
        if B % data_world:
            raise ValueError(
                f"trainer.global_batch_size={B} is not divisible by the {data_world} ranks; "
                "use a multiple of the world size"
            )
        per_rank = B // data_world
        micro = self.micro_batch_size or per_rank
        if per_rank % micro:
            raise ValueError(
                f"trainer.micro_batch_size={micro} does not divide the {per_rank} sequences per rank "
                f"(global_batch_size={B} over {data_world} ranks)"
            )
        return micro, per_rank // micro


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=TrainModelConfig)  # vocab_size: null = the data's
    router: RouterConfig = field(default_factory=RouterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 1337  # seeds the init, the batches, dropout and router noise

    def validate(self) -> None:
        self.model.validate()
        self.router.validate(self.router.num_experts_for(self.model.num_experts))
        self.optim.validate()
        self.data.validate()
        self.trainer.validate()
        if self.parallel.fsdp and self.trainer.engine != "native":
            raise ValueError(
                "parallel.fsdp=true shards with the native engine; use trainer.engine=native "
                "(DeepSpeed shards with its own ZeRO: trainer.zero_stage)"
            )
        gs = self.router.group_size
        if gs is not None and (self.model.seq_len % gs and gs % self.model.seq_len):
            raise ValueError(
                f"router.group_size={gs} must divide model.seq_len={self.model.seq_len} (or be a "
                "multiple of it that divides the micro batch); null uses one sequence per group"
            )


def register_configs() -> None:
    """Register the schema so configs/train.yaml is checked against it."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
