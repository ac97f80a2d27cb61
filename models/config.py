"""Structured config schemas for the `model` and `attention` Hydra nodes.

Each dataclass validates itself in `__post_init__` (`schema.require` / `schema.choice`, keys relative to
its node); `schema.validate(schema, node)` merges a Hydra node into it, rejects unknown keys and prefixes
the error with the node's path. The defaults here are the only ones: configs/model/*.yaml and
configs/attention/*.yaml set just what they change.
"""

import dataclasses
import os
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


# The subfolders of a diffusers pipeline folder (`WanPipeline.save_pretrained`, the released
# Wan-2.1 `*-Diffusers` repos) that `model.pretrained` reads, per part: (model key, subfolder, what it is).
PIPELINE_PARTS = (
    ("transformer", "transformer", "the diffusion transformer"),
    ("vae", "vae", "the VAE"),
    ("text_encoder", "text_encoder", "the text encoder"),
    ("text_encoder", "tokenizer", "the text encoder's tokenizer"),
)


def is_local_path(path: str) -> bool:
    """Whether `path` names a local folder rather than a hub id (`org/name`): it exists, or it is written as
    a path (absolute, `./`, `~`, or more than one `/`), so a typo fails as a missing folder, not a download."""
    return os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1


@dataclass
class ModelConfig:
    """The `model` node: model family (`models.families`) plus its transformer, VAE and text encoder.

    `pretrained` (a diffusers pipeline folder or hub id, e.g. a snapshot of
    Wan-AI/Wan2.1-T2V-1.3B-Diffusers) sets every part that has no `pretrained` of its own to that
    folder's `transformer/`, `vae/`, `text_encoder/` + `tokenizer/` (`arch` cleared, `subfolder` set); a
    part's own `pretrained` (e.g. `model.transformer.pretrained=<checkpoint>/transformer`) overrides it.
    A local folder missing a part fails here, naming the part and the path.
    """

    family: str = "wan"
    pretrained: str | None = None
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self):
        from models.families import ARCHS, FAMILIES

        choice("family", self.family, list(FAMILIES))
        if self.pretrained is not None:
            self._take_parts_from(self.pretrained)
        arch = self.transformer.arch
        if arch is not None:
            family_archs = [name for name, a in ARCHS.items() if a.family == self.family]
            require(
                ARCHS[arch].family == self.family,
                "transformer.arch",
                f"must be a {self.family!r} architecture (model.family), one of {family_archs}",
                arch,
            )

    def _take_parts_from(self, pipeline: str) -> None:
        """Point every part without its own `pretrained` at its subfolder of the pipeline `pipeline`."""
        local = is_local_path(pipeline)
        if local:
            require(
                os.path.isdir(pipeline), "pretrained", "is not a folder (nor a hub id org/name)", pipeline
            )
        for key, sub, what in PIPELINE_PARTS:
            if getattr(self, key).pretrained is not None:  # set per part: it overrides the pipeline's
                continue
            where = os.path.join(pipeline, sub)
            require(
                not local or os.path.isdir(where),
                "pretrained",
                f"the pipeline folder has no {sub}/ ({what}): {where} is missing; point "
                f"model.{key}.pretrained at it elsewhere, or use a complete diffusers pipeline folder",
                pipeline,
            )
        changes = {"arch": None, "pretrained": pipeline}
        if self.transformer.pretrained is None:
            self.transformer = dataclasses.replace(self.transformer, **changes, subfolder="transformer")
        if self.vae.pretrained is None:
            self.vae = dataclasses.replace(self.vae, **changes, subfolder="vae")
        if self.text_encoder.pretrained is None:
            self.text_encoder = dataclasses.replace(
                self.text_encoder, **changes, subfolder="text_encoder", tokenizer_subfolder="tokenizer"
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
