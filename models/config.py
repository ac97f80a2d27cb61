"""Structured config schemas for the `model` and `attention` Hydra nodes.

Each dataclass validates itself in `__post_init__` and names the offending key; unknown keys are
rejected by OmegaConf when a Hydra node is merged into the schema (`from_hydra`).
"""

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from omegaconf import OmegaConf

from models.encoders import TextEncoderConfig, VAEConfig
from vmoba import BACKENDS as ATTENTION_BACKENDS
from vmoba.config import VMoBAConfig

FAMILIES = ("wan", "cogvideox")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_TYPES = ("full", "vmoba")

T = TypeVar("T")


def from_hydra(schema: type[T], node: Any) -> T:
    """Merge a Hydra/OmegaConf node (or plain dict) into `schema` and return the validated dataclass."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


@dataclass
class TransformerConfig:
    """Which diffusion transformer to build (`models.transformer.build_transformer`).

    Exactly one of `arch` (a random-init architecture from `models.transformer.TRANSFORMER_ARCHS`,
    initialised from `seed`) and `pretrained` (a local diffusers folder or a hub id) is set, as for the
    VAE and text encoder. `subfolder` is the transformer's folder inside a full pipeline directory
    (`transformer` for a Wan-2.1 diffusers folder; None for a folder written by `save_pretrained` on the
    transformer itself). `dtype` is the parameter dtype after building.
    """

    arch: str | None = "tiny"
    pretrained: str | None = None
    subfolder: str | None = None
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        from models.transformer import TRANSFORMER_ARCHS  # lazy: models.transformer imports this module

        _check_choice("model.transformer.dtype", self.dtype, DTYPES)
        if (self.arch is None) == (self.pretrained is None):
            raise ValueError(
                "model.transformer: set exactly one of model.transformer.arch (one of "
                f"{sorted(TRANSFORMER_ARCHS)}) or model.transformer.pretrained (a diffusers folder or hub id); "
                f"got arch={self.arch!r}, pretrained={self.pretrained!r}"
            )
        if self.arch is not None:
            _check_choice("model.transformer.arch", self.arch, tuple(TRANSFORMER_ARCHS))


@dataclass
class ModelConfig:
    """The `model` node: model family plus its transformer, VAE and text encoder."""

    family: str = "wan"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self):
        from models.transformer import TRANSFORMER_ARCHS

        _check_choice("model.family", self.family, FAMILIES)
        arch = self.transformer.arch
        if arch is not None and TRANSFORMER_ARCHS[arch].family != self.family:
            family_archs = [name for name, a in TRANSFORMER_ARCHS.items() if a.family == self.family]
            raise ValueError(
                f"model.transformer.arch={arch!r} is a {TRANSFORMER_ARCHS[arch].family!r} architecture but "
                f"model.family={self.family!r}; choose one of {family_archs}"
            )


@dataclass
class AttentionConfig(VMoBAConfig):
    """The `attention` node: `type` (full | vmoba), the kernel `backend`, plus every `vmoba.VMoBAConfig`
    field (ignored when `type=full`). `to_vmoba()` returns the plain `VMoBAConfig`."""

    type: str = "vmoba"
    backend: str = "auto"

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as err:  # VMoBAConfig names the field; give the full key
            raise ValueError(f"attention.{err}") from None
        _check_choice("attention.type", self.type, ATTENTION_TYPES)
        _check_choice("attention.backend", self.backend, ATTENTION_BACKENDS)

    def to_vmoba(self) -> VMoBAConfig:
        return VMoBAConfig(**{f.name: getattr(self, f.name) for f in fields(VMoBAConfig)})
