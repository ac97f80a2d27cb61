"""Structured schemas for `configs/train.yaml` and `configs/sample.yaml`, validated when a run starts.

`load_config(cfg)` merges the composed Hydra tree into `TrainConfig`: an unknown key or a value of the
wrong type fails naming its full key (OmegaConf), and every dataclass's `__post_init__` checks ranges; its
error is prefixed with the path of the node it belongs to, e.g. `train.lr: must be > 0, got -1.0`.
"""

from dataclasses import dataclass, field
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf

from data.config import DataConfig
from models.config import AttentionConfig, ModelConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the full key."""


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key}: {rule}, got {value!r}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, key, f"must be one of {list(allowed)}", value)


@dataclass
class TrainLoopConfig:
    """The `train` node: the optimisation loop. `batch_size` is per rank and micro-step; one optimizer
    step sees `batch_size * grad_accum * world_size` clips."""

    steps: int = 300
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to min_lr_ratio * lr after warmup)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    activation_checkpointing: bool = False
    # With activation checkpointing: keep each block's self-attention output (and what its backward
    # needs) instead of recomputing it; faster, more memory (docs/training.md). keep_attention_blocks: in
    # the first N blocks only, a memory budget (null: every block).
    keep_attention: bool = False
    keep_attention_blocks: int | None = None
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 1

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            _require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        _require(self.lr > 0, "lr", "must be > 0", self.lr)
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
        _choice("lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)", self.grad_clip)
        _choice("precision", self.precision, ("auto", "bf16", "fp32"))
        _require(
            self.activation_checkpointing or not self.keep_attention,
            "keep_attention",
            "needs train.activation_checkpointing=true (without checkpointing nothing is recomputed)",
            self.keep_attention,
        )
        if self.keep_attention_blocks is not None:
            blocks = self.keep_attention_blocks
            _require(self.keep_attention, "keep_attention_blocks", "needs train.keep_attention=true", blocks)
            _require(blocks >= 0, "keep_attention_blocks", "must be >= 0 (null: every block)", blocks)


@dataclass
class ObjectiveConfig:
    """The `objective` node: rectified-flow timestep distribution (see `training.objective`)."""

    timestep_sampling: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0  # Wan's shift: t' = s t / (1 + (s - 1) t); 1 = no shift
    num_train_timesteps: int = 1000  # the transformer sees t * num_train_timesteps

    def __post_init__(self):
        _choice("timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal"))
        _require(self.logit_std > 0, "logit_std", "must be > 0", self.logit_std)
        _require(self.shift > 0, "shift", "must be > 0", self.shift)
        _require(
            self.num_train_timesteps >= 1, "num_train_timesteps", "must be >= 1", self.num_train_timesteps
        )


@dataclass
class OptimizerConfig:
    """The `optimizer` node. `adamw` is torch's AdamW handed to DeepSpeed as the client optimizer (no
    build step); `deepspeed_adam` lets DeepSpeed pick FusedAdam / DeepSpeedCPUAdam (JIT-built op)."""

    name: str = "adamw"  # adamw | deepspeed_adam
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        _choice("name", self.name, ("adamw", "deepspeed_adam"))
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            "must be 2 values in [0, 1)",
            self.betas,
        )
        _require(self.eps > 0, "eps", "must be > 0", self.eps)
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)


@dataclass
class DeepSpeedConfig:
    """The `deepspeed` node: the ZeRO settings the DeepSpeed JSON config is generated from
    (`training.engine.deepspeed_config`)."""

    stage: int = 2  # ZeRO stage 0 | 1 | 2 | 3
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu (stage 3 only)
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000

    def __post_init__(self):
        _choice("stage", self.stage, (0, 1, 2, 3))
        _choice("offload_optimizer", self.offload_optimizer, ("none", "cpu"))
        _choice("offload_param", self.offload_param, ("none", "cpu"))
        _require(
            self.offload_param == "none" or self.stage == 3,
            "offload_param",
            "needs stage=3",
            self.offload_param,
        )
        _require(
            self.offload_optimizer == "none" or self.stage >= 1,
            "offload_optimizer",
            "needs stage>=1",
            self.offload_optimizer,
        )
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            _require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))


@dataclass
class EMAConfig:
    """The `ema` node: exponential moving average of the transformer weights (exported as
    `transformer_ema/` next to `transformer/` in each checkpoint)."""

    enabled: bool = False
    decay: float = 0.999

    def __post_init__(self):
        _require(0 < self.decay < 1, "decay", "must be in (0, 1)", self.decay)


@dataclass
class EvalConfig:
    """The `eval` node: validation loss on held-out cached clips at fixed timesteps and noise, and VMoBA
    attention recall per layer, every `every` steps (0 = only at the end)."""

    every: int = 100
    num_batches: int = 2
    batch_size: int = 1
    timesteps: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seed: int = 1234
    recall: bool = True

    def __post_init__(self):
        _require(self.every >= 0, "every", "must be >= 0 (0 = only at the end)", self.every)
        _require(self.num_batches >= 1, "num_batches", "must be >= 1", self.num_batches)
        _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _require(
            len(self.timesteps) >= 1 and all(0 < t <= 1 for t in self.timesteps),
            "timesteps",
            "must be values in (0, 1]",
            self.timesteps,
        )


@dataclass
class GenerationConfig:
    """What to generate: prompts, fixed seed (noise drawn on CPU so every device gets the same), Euler
    steps, classifier-free guidance (1 = off), output size. `frames` must be 4k+1 for Wan's VAE."""

    prompts: list[str] = field(default_factory=lambda: ["a red ball rolls across a green field"])
    negative_prompt: str = ""
    seed: int = 42
    steps: int = 20
    guidance: float = 1.0
    frames: int = 9
    height: int = 32
    width: int = 32
    fps: int = 8
    shift: float | None = None  # sampling shift; None = objective.shift

    def __post_init__(self):
        _require(len(self.prompts) >= 1, "prompts", "must name at least one prompt", self.prompts)
        _require(self.steps >= 1, "steps", "must be >= 1", self.steps)
        _require(
            self.guidance >= 1,
            "guidance",
            "must be >= 1 (1 disables classifier-free guidance)",
            self.guidance,
        )
        for key in ("frames", "height", "width", "fps"):
            _require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        _require(self.shift is None or self.shift > 0, "shift", "must be > 0 or null", self.shift)


@dataclass
class SampleConfig(GenerationConfig):
    """The `sample` node of train.py: periodic samples every `every` steps (0 = only at the end)."""

    every: int = 100

    def __post_init__(self):
        super().__post_init__()
        _require(self.every >= 0, "every", "must be >= 0 (0 = only at the end)", self.every)


@dataclass
class CheckpointConfig:
    """The `checkpoint` node: save every `every` steps and at the end, keep the newest `keep`; resume from
    `<run_dir>/checkpoints/latest` when it exists (or from `load`, a checkpoint dir, when set)."""

    every: int = 100
    keep: int = 2
    resume: bool = True
    load: str | None = None

    def __post_init__(self):
        _require(self.every >= 1, "every", "must be >= 1", self.every)
        _require(self.keep >= 1, "keep", "must be >= 1", self.keep)


@dataclass
class WandbConfig:
    """The `wandb` node. `name` None = the Hydra overrides of the run (`attention=full,seed=1`)."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "vmoba"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        _choice("mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class TrainConfig:
    """The whole `configs/train.yaml` tree."""

    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    data: DataConfig = MISSING
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = 0

    def __post_init__(self):
        # EMA keeps full copies of the local parameters; under ZeRO-3 those are shards.
        _require(
            not (self.ema.enabled and self.deepspeed.stage == 3),
            "ema.enabled",
            "is not supported with deepspeed.stage=3",
            True,
        )


@dataclass
class SampleAppConfig(GenerationConfig):
    """The whole `configs/sample.yaml` tree (sample.py). `checkpoint` is a run dir (its `latest`), a
    checkpoint dir (`.../checkpoints/step_000100`) or an exported diffusers transformer folder."""

    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: str | None = None  # None: the random-init model.transformer (smoke tests, benchmarks)
    use_ema: bool = False
    output_dir: str = "outputs/samples"
    precision: str = "auto"  # auto | bf16 | fp32
    prompts_file: str | None = None  # one prompt per line; replaces `prompts`

    def __post_init__(self):
        super().__post_init__()
        _choice("precision", self.precision, ("auto", "bf16", "fp32"))


def _error_path(node: DictConfig, path: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The path of the deepest sub-node whose own validation raises ValueError."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (None, dict):
            try:
                OmegaConf.to_object(child)
            except ValueError:
                return _error_path(child, (*path, str(key)))
    return path


def _with_path(path: tuple[str, ...], message: str) -> str:
    """Prefix `message` with `path`, merging the part the message already names (`vae.dtype ...`)."""
    for i in range(len(path)):
        tail = ".".join(path[i:])
        if message.startswith(tail) and message[len(tail) : len(tail) + 1] in (".", "=", ":", " "):
            return ".".join(path[:i] + (message,)) if i else message
    return ".".join((*path, message))


def validate(schema: type[T], cfg: Any) -> T:
    """Merge `cfg` (DictConfig or dict) into `schema` and return the validated dataclass instance.

    Raises ConfigError whose message starts with the full key of the bad value."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except Exception as err:  # OmegaConf's errors carry the full key on a `full_key:` line
        raise ConfigError(_omegaconf_message(err)) from err
    try:
        return OmegaConf.to_object(merged)
    except ValueError as err:
        raise ConfigError(_with_path(_error_path(merged), str(err))) from err
    except Exception as err:
        raise ConfigError(_omegaconf_message(err)) from err


def _omegaconf_message(err: Exception) -> str:
    lines = str(err).splitlines()
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "")
    return f"{key}: {lines[0]}" if key else lines[0]


def load_config(cfg: DictConfig) -> TrainConfig:
    """Validate the composed `configs/train.yaml` tree; fails before any work, naming the key."""
    return validate(TrainConfig, cfg)
