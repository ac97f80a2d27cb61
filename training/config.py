"""Structured schemas for `configs/train.yaml` and `configs/sample.yaml`, validated when a run starts.

`load_config(cfg)` merges the composed Hydra tree into `TrainConfig` (`schema.validate`): an unknown key or
a value of the wrong type fails naming its full key (OmegaConf), and every dataclass's `__post_init__`
checks ranges; its error is prefixed with the path of the node it belongs to, e.g.
`train.lr: must be > 0, got -1.0`. The defaults here are the only ones: the YAML files set what they change.
"""

from dataclasses import dataclass, field

from omegaconf import MISSING, DictConfig

from data.config import DataConfig
from models.config import AttentionConfig, ModelConfig
from schema import ConfigError, choice, register_schema, require, validate
from training.objective import SCHEDULERS

__all__ = ["ConfigError", "TrainConfig", "SampleAppConfig", "load_config", "validate"]


@dataclass
class LoRAConfig:
    """The `train.lora` node: train LoRA adapters (peft) on the frozen transformer instead of every weight
    (`models.lora`). `target_modules`: module-name suffixes (peft's matching), e.g. `attn1.to_q`; null =
    the q/k/v/o projections of self- and cross-attention and the FFN of every Wan block."""

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float | None = None  # the adapter's scale is alpha / rank; null = rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] | None = None
    merge_on_export: bool = False  # also export the merged transformer as transformer/ per checkpoint

    def __post_init__(self):
        require(self.rank >= 0, "rank", "must be >= 0 (0 = off)", self.rank)
        require(self.alpha is None or self.alpha > 0, "alpha", "must be > 0 or null (= rank)", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)
        require(
            self.target_modules is None or len(self.target_modules) >= 1,
            "target_modules",
            "must name at least one module, or be null (the default targets)",
            self.target_modules,
        )


@dataclass
class TrainLoopConfig:
    """The `train` node: the optimisation loop. `batch_size` is per data-parallel rank and micro-step; one
    optimizer step sees `batch_size * grad_accum * world_size / sequence_parallel` clips."""

    steps: int = 300  # optimizer steps
    batch_size: int = 1  # clips per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # constant | linear | cosine (decay to min_lr_ratio * lr after warmup)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    activation_checkpointing: bool = False
    # With activation checkpointing: keep each block's self-attention output (and what its backward
    # needs) instead of recomputing it; faster, more memory (docs/training.md). keep_attention_blocks: in
    # the first N blocks only, a memory budget (null: every block).
    keep_attention: bool = False
    keep_attention_blocks: int | None = None
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 1
    # Ulysses sequence parallelism: each clip's tokens split over this many ranks (dividing the process
    # count and the attention heads); the remaining factor is data parallelism (models.sequence_parallel).
    sequence_parallel: int = 1
    # Stop after this many optimizer steps in a row were skipped for a NaN/Inf loss or gradient norm
    # (each skipped step leaves the weights, the step count and the LR schedule as they were).
    max_nan_steps: int = 5
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # rank > 0: LoRA instead of full fine-tuning

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum", "log_every", "sequence_parallel", "max_nan_steps"):
            require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        require(self.lr > 0, "lr", "must be > 0", self.lr)
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
        choice("lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)", self.grad_clip)
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        require(
            self.activation_checkpointing or not self.keep_attention,
            "keep_attention",
            "needs train.activation_checkpointing=true (without checkpointing nothing is recomputed)",
            self.keep_attention,
        )
        if self.keep_attention_blocks is not None:
            blocks = self.keep_attention_blocks
            require(self.keep_attention, "keep_attention_blocks", "needs train.keep_attention=true", blocks)
            require(blocks >= 0, "keep_attention_blocks", "must be >= 0 (null: every block)", blocks)


@dataclass
class ObjectiveConfig:
    """The `objective` node: rectified-flow timestep distribution (see `training.objective`)."""

    timestep_sampling: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0  # Wan's shift: t' = s t / (1 + (s - 1) t); 1 = no shift
    num_train_timesteps: int = 1000  # the transformer sees t * num_train_timesteps

    def __post_init__(self):
        choice("timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal"))
        require(self.logit_std > 0, "logit_std", "must be > 0", self.logit_std)
        require(self.shift > 0, "shift", "must be > 0", self.shift)
        require(
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
        choice("name", self.name, ("adamw", "deepspeed_adam"))
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            "must be 2 values in [0, 1)",
            self.betas,
        )
        require(self.eps > 0, "eps", "must be > 0", self.eps)
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)


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
    # Time every collective (DeepSpeed's comms logger) and log `comm_fraction` of the step time. Each
    # timed collective synchronises the device, which serialises ZeRO's overlap: a measurement, not a
    # default.
    comms_logger: bool = False

    def __post_init__(self):
        choice("stage", self.stage, (0, 1, 2, 3))
        choice("offload_optimizer", self.offload_optimizer, ("none", "cpu"))
        choice("offload_param", self.offload_param, ("none", "cpu"))
        require(
            self.offload_param == "none" or self.stage == 3,
            "offload_param",
            "needs stage=3",
            self.offload_param,
        )
        require(
            self.offload_optimizer == "none" or self.stage >= 1,
            "offload_optimizer",
            "needs stage>=1",
            self.offload_optimizer,
        )
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))


@dataclass
class EMAConfig:
    """The `ema` node: exponential moving average of the transformer weights (exported as
    `transformer_ema/` next to `transformer/` in each checkpoint)."""

    enabled: bool = False
    decay: float = 0.999  # the ceiling; step t uses min(decay, (1 + t) / (10 + t)) (training.ema)

    def __post_init__(self):
        require(0 < self.decay < 1, "decay", "must be in (0, 1)", self.decay)


@dataclass
class EvalConfig:
    """The `eval` node: validation loss on held-out cached clips at fixed timesteps and noise, and VMoBA
    attention recall per layer, every `every` steps (0 = only at the end)."""

    every: int = 100
    num_batches: int = 2
    batch_size: int = 1
    timesteps: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seed: int = 1234
    recall: bool = True  # VMoBA attention recall per layer (one forward)

    def __post_init__(self):
        require(self.every >= 0, "every", "must be >= 0 (0 = only at the end)", self.every)
        require(self.num_batches >= 1, "num_batches", "must be >= 1", self.num_batches)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        require(
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
    seed: int = 42  # fixed noise: the same seed and prompts give VMoBA and baseline runs the same noise
    steps: int = 20
    guidance: float = 1.0  # classifier-free guidance scale; 1 disables
    frames: int = 17  # 4k+1 (train.yaml links train.py's samples to the data size)
    height: int = 128  # a multiple of 16
    width: int = 128
    fps: int = 8
    shift: float | None = None  # sampling shift; None = objective.shift
    # euler: our Euler steps over the shifted linspace(1, 0, steps + 1); unipc: diffusers'
    # UniPCMultistepScheduler as WanPipeline runs it (training.objective, docs/training.md "Sampling")
    scheduler: str = "euler"

    def __post_init__(self):
        require(len(self.prompts) >= 1, "prompts", "must name at least one prompt", self.prompts)
        require(self.steps >= 1, "steps", "must be >= 1", self.steps)
        require(
            self.guidance >= 1,
            "guidance",
            "must be >= 1 (1 disables classifier-free guidance)",
            self.guidance,
        )
        for key in ("frames", "height", "width", "fps"):
            require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        require(self.shift is None or self.shift > 0, "shift", "must be > 0 or null", self.shift)
        choice("scheduler", self.scheduler, SCHEDULERS)


@dataclass
class SampleConfig(GenerationConfig):
    """The `sample` node of train.py: periodic samples every `every` steps (0 = only at the end)."""

    prompts: list[str] = field(
        default_factory=lambda: [
            "a red ball rolls across a green field",
            "a camera pans slowly over a city street at night",
        ]
    )
    every: int = 150

    def __post_init__(self):
        super().__post_init__()
        require(self.every >= 0, "every", "must be >= 0 (0 = only at the end)", self.every)


@dataclass
class CheckpointConfig:
    """The `checkpoint` node: save every `every` steps and at the end, keep the newest `keep`; resume from
    `<run_dir>/checkpoints/latest` when it exists (or from `load`, a checkpoint dir, when set).
    `allow_changes`: config keys (or nodes, e.g. `attention`) a resume may change although they alter
    training (`training.resume`; refused otherwise)."""

    every: int = 100
    keep: int = 2
    resume: bool = True  # continue from <run dir>/checkpoints/latest when it exists
    load: str | None = None  # or resume from this checkpoint dir
    allow_changes: list[str] = field(default_factory=list)  # e.g. [train.lr]
    # Make each checkpoint a whole diffusers pipeline (model_index.json, scheduler/, vae/, text_encoder/,
    # tokenizer/ hard-linked to one copy per run: training.export); false: transformer/ only.
    pipeline: bool = True

    def __post_init__(self):
        require(self.every >= 1, "every", "must be >= 1", self.every)
        require(self.keep >= 1, "keep", "must be >= 1", self.keep)


@dataclass
class WandbConfig:
    """The `wandb` node. `name` None = the Hydra overrides of the run (`attention=full,seed=1`)."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "vmoba"
    entity: str | None = None
    name: str | None = None
    # Runs compared with each other share one (scripts/compare.py --launch and `make demo` set it), so the
    # comparison report's run joins them in the wandb UI.
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        choice("mode", self.mode, ("offline", "online", "disabled"))


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
    seed: int = 0  # model-independent seeds: data order, timesteps, noise


@dataclass
class SampleAppConfig(GenerationConfig):
    """The whole `configs/sample.yaml` tree (sample.py). `checkpoint` is a run dir (its `latest`), a
    checkpoint dir (`.../checkpoints/step_000100`) or an exported diffusers transformer folder."""

    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: str | None = None  # None: the random-init model.transformer (smoke tests, benchmarks)
    use_ema: bool = False
    output_dir: str = MISSING  # configs/sample.yaml: outputs/samples/<date>_<time> (a Hydra interpolation)
    precision: str = "auto"  # auto | bf16 | fp32
    prompts_file: str | None = None  # one prompt per line; replaces `prompts`
    # A LoRA adapter on top of the base model (`model.*`, or `checkpoint`): a LoRA run dir (its latest
    # checkpoint), a checkpoint dir, its lora/ dir or a .safetensors file (diffusers or original Wan /
    # ComfyUI keys); `use_ema` picks lora_ema/. `lora_scale` scales the adapter's update (1 = as trained).
    lora: str | None = None
    lora_scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        choice("precision", self.precision, ("auto", "bf16", "fp32"))


# The first entry of configs/train.yaml's and configs/sample.yaml's defaults lists: the schemas' defaults
# are the config's, so every key can be overridden on the command line and `--cfg job` shows every value.
register_schema("train_schema", TrainConfig)
register_schema("sample_schema", SampleAppConfig)


def load_config(cfg: DictConfig) -> TrainConfig:
    """Validate the composed `configs/train.yaml` tree; fails before any work, naming the key."""
    return validate(TrainConfig, cfg)
