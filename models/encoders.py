"""VAE and text-encoder builders, and the latent encode/decode used by caching, training and sampling.

Tiny architectures are built randomly from a fixed seed (tests, the CPU demo); real weights load with
``from_pretrained(path_or_hub_id, subfolder=...)``, the same call for a local directory or a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Named random-init VAE architectures. "tiny" keeps Wan's real compression (4x time, 8x space, so clips
# have 4k+1 frames) with 4 latent channels; the mean/std are fixed non-trivial values so the
# normalisation is exercised. "wan2.1" is diffusers' default AutoencoderKLWan (the Wan 2.1 VAE shape).
VAE_ARCHS = {
    "tiny": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[0.9, 1.1, 1.2, 0.8],
    ),
    "wan2.1": {},
}

# Named random-init UMT5 encoder architectures; vocab_size defaults to the local tokenizer's. "umt5-xxl"
# is Wan's text encoder shape (for memory/speed benchmarks; real use loads it with `pretrained`).
TEXT_ARCHS = {
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "umt5-xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384),
}

# The local tokenizer's vocabulary: common words plus everything the demo captions use. Unknown words
# map to <unk>, which is fine for random-init encoders (real encoders ship their own tokenizer).
_WORDS = """
a an the of in on at to from with and or but over under across into onto through around toward away
up down left right slowly quickly slow fast gentle smooth steady camera pan pans panning zoom zooms
zooming rotate rotates rotating rotation tilt tilts moves moving move shot view close wide photo picture
image scene video clip frame of clockwise counterclockwise in out toward by is are was be this that
astronaut white spacesuit flag space cup coffee saucer table cat tabby orange sleeping lying rocket launch
pad sky smoke galaxies stars deep field hubble cells tissue stain microscope colour color wheel rainbow
bricks brick wall grass green gravel stones coins silver moon crater craters surface page text printed letters
man woman person people dog bird tree trees water river sea ocean beach mountain city street car road
house building window door light dark red blue yellow black bright night day sun cloud clouds snow rain
forest field flower flowers small large big little old new young running walking flying standing sitting
""".split()


@dataclass
class VAEConfig:
    """Which VAE encodes clips: a named random-init ``arch`` or ``pretrained`` weights (exactly one)."""

    arch: str | None = "tiny"  # named random-init architecture: tiny | wan2.1; None when pretrained
    pretrained: str | None = None  # local dir or hub id, loaded with from_pretrained
    subfolder: str | None = None  # e.g. "vae" inside a diffusers pipeline repo
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def __post_init__(self):
        _check_source("vae", self.arch, self.pretrained, VAE_ARCHS)
        _check_dtype("vae.dtype", self.dtype)


@dataclass
class TextEncoderConfig:
    """Which text encoder embeds captions: a named random-init ``arch`` or ``pretrained`` weights."""

    arch: str | None = "tiny"  # named random-init architecture: tiny | umt5-xxl; None when pretrained
    pretrained: str | None = None  # local dir or hub id, loaded with from_pretrained
    subfolder: str | None = None  # e.g. "text_encoder"
    tokenizer_subfolder: str | None = None  # e.g. "tokenizer"
    max_length: int = 32  # tokens per prompt, padded/truncated (Wan uses 512)
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def __post_init__(self):
        _check_source("text_encoder", self.arch, self.pretrained, TEXT_ARCHS)
        _check_dtype("text_encoder.dtype", self.dtype)
        if self.max_length < 1:
            raise ValueError(f"text_encoder.max_length must be >= 1, got {self.max_length}")


def _check_source(node: str, arch, pretrained, archs: dict) -> None:
    if (arch is None) == (pretrained is None):
        raise ValueError(
            f"{node}: set exactly one of {node}.arch (one of {sorted(archs)}) or {node}.pretrained "
            f"(a local dir or hub id); got arch={arch!r}, pretrained={pretrained!r}"
        )
    if arch is not None and arch not in archs:
        raise ValueError(f"{node}.arch must be one of {sorted(archs)}, got {arch!r}")


def _check_dtype(key: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {dtype!r}")


def load_error(node: str, pretrained: str, subfolder: str | None, err: Exception) -> OSError:
    """The error for a part that does not load: its key, the folder it looked in, and the cause."""
    import os

    where = os.path.join(pretrained, subfolder or "")
    return OSError(
        f"model.{node}.pretrained={pretrained!r} (subfolder={subfolder!r}): nothing loadable at {where!r} "
        f"(a diffusers/transformers folder) nor as a hub id (HF_HUB_OFFLINE="
        f"{os.environ.get('HF_HUB_OFFLINE', '0')}): {type(err).__name__}: {str(err)[:300]}"
    )


def build_vae(cfg: VAEConfig):
    """The VAE (a diffusers ``AutoencoderKLWan``) in eval mode, on CPU, in ``cfg.dtype`` (random from
    seed 0 for ``arch``)."""
    from diffusers import AutoencoderKLWan  # imported here so configs load without diffusers

    dtype = DTYPES[cfg.dtype]
    if cfg.pretrained is not None:
        try:
            vae = AutoencoderKLWan.from_pretrained(cfg.pretrained, subfolder=cfg.subfolder, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise load_error("vae", cfg.pretrained, cfg.subfolder, err) from err
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = AutoencoderKLWan(**VAE_ARCHS[cfg.arch])
        if dtype != torch.float32:  # built in fp32; skip a no-op cast (diffusers warns on every `.to`)
            vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)


def build_tokenizer():
    """A word-level tokenizer built locally (no download): lowercase, whitespace/punctuation split,
    ``</s>`` appended, ``<pad>`` = 0 as in T5."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


class TextEncoder(torch.nn.Module):
    """A tokenizer + T5-family encoder that turns prompts into padded embeddings."""

    def __init__(self, tokenizer, model, max_length: int):
        super().__init__()
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Returns ``emb [B, S, C]`` float32 with ``S = max_length`` and zeros at padding (as diffusers'
        WanPipeline does, so padding never leaks into cross-attention), and ``mask [B, S]`` bool.
        """
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        mask = mask.bool()
        return emb * mask[..., None], mask


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The text encoder in eval mode, on CPU, in ``cfg.dtype`` (random from seed 0 for ``arch``)."""
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel, UMT5Config, UMT5EncoderModel

    if cfg.pretrained is not None:
        try:
            kind = AutoConfig.from_pretrained(cfg.pretrained, subfolder=cfg.subfolder or "").model_type
        except (OSError, ValueError) as err:
            raise load_error("text_encoder", cfg.pretrained, cfg.subfolder, err) from err
        classes = {"umt5": UMT5EncoderModel, "t5": T5EncoderModel}
        if kind not in classes:
            raise ValueError(
                f"text_encoder.pretrained: model_type {kind!r} unsupported (allowed: {sorted(classes)})"
            )
        model = classes[kind].from_pretrained(
            cfg.pretrained, subfolder=cfg.subfolder or "", dtype=DTYPES[cfg.dtype]
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained, subfolder=cfg.tokenizer_subfolder or "")
        except (OSError, ValueError) as err:
            raise load_error("text_encoder", cfg.pretrained, cfg.tokenizer_subfolder, err) from err
    else:
        tokenizer = build_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            arch = {"vocab_size": len(tokenizer), **TEXT_ARCHS[cfg.arch]}
            model = UMT5EncoderModel(UMT5Config(dropout_rate=0.0, **arch))
    model = model.to(DTYPES[cfg.dtype]).eval().requires_grad_(False)
    return TextEncoder(tokenizer, model, cfg.max_length)


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel ``latents_mean`` / ``latents_std`` shaped ``[1, C, 1, 1, 1]``."""
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


@torch.no_grad()
def encode_video(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Encode ``pixels [B, 3, F, H, W]`` in [-1, 1] into normalised latents ``[B, C, F', H', W']``.

    ``F' = (F - 1) / 4 + 1``, ``H' = H / 8``, ``W' = W / 8`` for Wan. Deterministic: the posterior mode,
    then ``(z - latents_mean) / latents_std`` as diffusers' WanPipeline expects. Returns the VAE's dtype.
    """
    param = next(vae.parameters())
    z = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mode()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode normalised ``latents [B, C, F', H', W']`` into ``pixels [B, 3, F, H, W]`` in [-1, 1]."""
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype)
    mean, std = _latent_stats(vae, z)
    return vae.decode(z * std + mean).sample.clamp(-1, 1)
