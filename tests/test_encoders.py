"""models.encoders: tiny VAE / UMT5 built locally, saved and re-loaded through from_pretrained."""

import pytest
import torch

from models.encoders import (
    TextEncoderConfig,
    VAEConfig,
    build_text_encoder,
    build_tokenizer,
    build_vae,
    decode_latents,
    encode_video,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A diffusers-pipeline-like folder: vae/, text_encoder/, tokenizer/ written with save_pretrained."""
    root = tmp_path_factory.mktemp("pipeline")
    build_vae(VAEConfig()).save_pretrained(root / "vae")
    text = build_text_encoder(TextEncoderConfig())
    text.model.save_pretrained(root / "text_encoder")
    text.tokenizer.save_pretrained(root / "tokenizer")
    return root


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="vae.arch must be one of"):
        VAEConfig(arch="huge")
    with pytest.raises(ValueError, match="exactly one of vae.arch"):
        VAEConfig(arch="tiny", pretrained="/some/dir")
    with pytest.raises(ValueError, match="exactly one of text_encoder.arch"):
        TextEncoderConfig(arch=None)
    with pytest.raises(ValueError, match="text_encoder.dtype must be one of"):
        TextEncoderConfig(dtype="float8")
    with pytest.raises(ValueError, match="text_encoder.max_length"):
        TextEncoderConfig(max_length=0)


def test_tiny_vae_compression_and_normalisation_against_float64():
    vae = build_vae(VAEConfig())
    assert vae.config.z_dim == 4 and len(vae.config.latents_mean) == 4
    pixels = (
        torch.rand(2, 3, 5, 16, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    )  # [B, 3, F, H, W]
    latents = encode_video(vae, pixels)
    assert latents.shape == (2, 4, 2, 2, 4)  # (5 - 1) / 4 + 1 frames, 8x smaller space
    # Reference: the posterior mean in float64, normalised by hand with the config's mean/std.
    ref_vae = build_vae(VAEConfig()).double()
    z = ref_vae.encode(pixels.double()).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents.double(), (z - mean) / std, atol=1e-4, rtol=1e-4)
    # Deterministic (posterior mode, not a sample).
    torch.testing.assert_close(encode_video(vae, pixels), latents, atol=0, rtol=0)
    # decode_latents undoes the normalisation before decoding and returns pixels in [-1, 1].
    decoded = decode_latents(vae, latents)
    assert decoded.shape == pixels.shape and decoded.abs().max() <= 1
    ref_pixels = ref_vae.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded.double(), ref_pixels, atol=1e-4, rtol=1e-4)


def test_text_encoder_padding_mask_and_zeroed_padding():
    text = build_text_encoder(TextEncoderConfig(max_length=12))
    prompts = [
        "a cat on the moon",
        "the camera pans slowly to the right across a photo of a rocket on the pad",
    ]
    emb, mask = text.encode(prompts)
    assert emb.shape == (2, 12, 32) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] * 6 + [False] * 6  # 5 words + </s>
    assert mask[1].all()  # truncated to max_length
    assert (emb[0, 6:] == 0).all() and (emb[0, :6].abs().sum(-1) > 0).all()
    # Padding never changes the valid positions' embeddings (the encoder masks padded keys).
    alone, _ = text.encode(prompts[:1])
    torch.testing.assert_close(alone, emb[:1], atol=1e-5, rtol=1e-5)


def test_tokenizer_is_local_and_t5_like():
    tok = build_tokenizer()
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    ids = tok("A Cat, ON the moon")["input_ids"]
    assert ids[-1] == 1 and tok.unk_token_id not in ids[:2]
    assert tok.convert_ids_to_tokens(ids[:2]) == ["a", "cat"]


def test_from_pretrained_round_trip(saved):
    pixels = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    vae = build_vae(VAEConfig())
    loaded = build_vae(VAEConfig(arch=None, pretrained=str(saved), subfolder="vae"))
    torch.testing.assert_close(encode_video(loaded, pixels), encode_video(vae, pixels), atol=0, rtol=0)

    text = build_text_encoder(TextEncoderConfig())
    cfg = TextEncoderConfig(
        arch=None, pretrained=str(saved), subfolder="text_encoder", tokenizer_subfolder="tokenizer"
    )
    loaded_text = build_text_encoder(cfg)
    prompts = ["a red ball rolls across a green field", "zebra"]
    for got, want in zip(loaded_text.encode(prompts), text.encode(prompts)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_pretrained_dtype_is_applied(saved):
    vae = build_vae(VAEConfig(arch=None, pretrained=str(saved), subfolder="vae", dtype="bfloat16"))
    assert next(vae.parameters()).dtype == torch.bfloat16
    latents = encode_video(vae, torch.rand(1, 3, 5, 16, 16) * 2 - 1)
    assert latents.dtype == torch.bfloat16 and latents.shape == (1, 4, 2, 2, 2)
