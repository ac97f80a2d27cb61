"""Structured config schemas for the `model` and `attention` Hydra nodes.

Each dataclass validates itself in `__post_init__` (`schema.require` / `schema.choice`, keys relative to
its node); `schema.validate(schema, node)` merges a Hydra node into it, rejects unknown keys and prefixes
the error with the node's path. The defaults here are the only ones: configs/model/*.yaml and
configs/attention/*.yaml set just what they change.
"""

from dataclasses import dataclass, field, fields

from models.encoders import TextEncoderConfig, VAEConfig
from schema import choice, require
from vmoba import BACKENDS as ATTENTION_BACKENDS
from vmoba.config import VMoBAConfig

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_TYPES = ("full", "vmoba")


@dataclass
class TransformerConfig:
    """Which diffusion transformer to build (`models.transformer.build_transformer`).

    Exactly one of `arch` (a random-init architecture from `models.families.ARCHS`, initialised from `seed`)
    and `pretrained` (a local diffusers folder or a hub id) is set, as for the VAE and text encoder.
    `subfolder` is the transformer's folder inside a full pipeline directory (`transformer` for a Wan-2.1
    diffusers folder; None for a folder written by `save_pretrained` on the transformer itself). `dtype` is
    the parameter dtype after building.
    """

    arch: str | None = "tiny"
    pretrained: str | None = None
    subfolder: str | None = None
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        from models.families import ARCHS  # lazy: keeps `import models.config` free of diffusers

        choice("dtype", self.dtype, DTYPES)
        require(
            (self.arch is None) != (self.pretrained is None),
            "arch",
            f"exactly one of arch (one of {sorted(ARCHS)}) and pretrained (a diffusers folder or hub id) "
            f"must be set; pretrained={self.pretrained!r}",
            self.arch,
        )
        if self.arch is not None:
            choice("arch", self.arch, sorted(ARCHS))


@dataclass
class ModelConfig:
    """The `model` node: model family (`models.families`) plus its transformer, VAE and text encoder."""

    family: str = "wan"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self):
        from models.families import ARCHS, FAMILIES

        choice("family", self.family, list(FAMILIES))
        arch = self.transformer.arch
        if arch is not None:
            family_archs = [name for name, a in ARCHS.items() if a.family == self.family]
            require(
                ARCHS[arch].family == self.family,
                "transformer.arch",
                f"must be a {self.family!r} architecture (model.family), one of {family_archs}",
                arch,
            )


@dataclass
class AttentionConfig(VMoBAConfig):
    """The `attention` node: `type`, the kernel `backend`, plus every `vmoba.VMoBAConfig` field (ignored
    when `type=full`). `to_vmoba()` returns the plain `VMoBAConfig`."""

    type: str = "vmoba"  # full (dense SDPA, the baseline) | vmoba
    # auto (CUDA: keyed for token granularity, fa4 for block where installed, else flex; CPU: reference)
    # | reference | flex | fa4 | keyed | flash_varlen
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        choice("type", self.type, ATTENTION_TYPES)
        choice("backend", self.backend, ATTENTION_BACKENDS)

    def to_vmoba(self) -> VMoBAConfig:
        return VMoBAConfig(**{f.name: getattr(self, f.name) for f in fields(VMoBAConfig)})
