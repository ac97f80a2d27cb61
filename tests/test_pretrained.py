"""`model.pretrained=<diffusers pipeline folder>`: every part from its subfolder, per-part keys override,
a missing part fails naming the part and the path. The folder is a tiny Wan pipeline written by diffusers'
own `WanPipeline.save_pretrained` from the project's tiny parts."""

import shutil
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig, TransformerConfig
from models.encoders import TextEncoderConfig, VAEConfig, build_text_encoder, build_vae, encode_video
from models.transformer import build_transformer
from schema import ConfigError, compose, validate
from training.config import SampleAppConfig, TrainConfig  # registers the schemas the configs start from
from training.objective import unipc_scheduler


def save_tiny_pipeline(path: Path, seed: int = 5) -> Path:
    """A tiny Wan-2.1-like pipeline folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/
    model_index.json) written by `WanPipeline.save_pretrained`; the transformer drawn from `seed` (the
    VAE and text encoder are the tiny archs' fixed-seed weights)."""
    from diffusers import WanPipeline

    text = build_text_encoder(TextEncoderConfig())
    pipe = WanPipeline(
        tokenizer=text.tokenizer, text_encoder=text.model, vae=build_vae(VAEConfig()),
        transformer=build_transformer(TransformerConfig(seed=seed)), scheduler=unipc_scheduler(3.0, 1000),
    )  # fmt: skip
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("wan") / "Tiny-Wan-Diffusers")


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_option_sets_every_part_from_its_subfolder(pipeline_dir):
    model = ModelConfig(pretrained=str(pipeline_dir))
    assert (model.transformer.arch, model.transformer.pretrained, model.transformer.subfolder) == (
        None, str(pipeline_dir), "transformer",
    )  # fmt: skip
    assert (model.vae.arch, model.vae.subfolder) == (None, "vae")
    assert (model.text_encoder.subfolder, model.text_encoder.tokenizer_subfolder) == (
        "text_encoder",
        "tokenizer",
    )
    # The loaded parts are the saved ones: the transformer drawn from seed 5 (not the default seed 0).
    want = _params(build_transformer(TransformerConfig(seed=5)))
    got = _params(build_transformer(model.transformer))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    pixels = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(
        encode_video(build_vae(model.vae), pixels),
        encode_video(build_vae(VAEConfig()), pixels),
        atol=0,
        rtol=0,
    )
    prompts = ["a cat sleeping on a table", "zebra"]
    for got_t, want_t in zip(
        build_text_encoder(model.text_encoder).encode(prompts),
        build_text_encoder(TextEncoderConfig()).encode(prompts),
    ):
        torch.testing.assert_close(got_t, want_t, atol=0, rtol=0)


def test_per_part_keys_override_and_the_command_line_spells_it(pipeline_dir, tmp_path):
    other = tmp_path / "trained"
    build_transformer(TransformerConfig(seed=9)).save_pretrained(other)
    overrides = [
        f"model.pretrained={pipeline_dir}", "model.transformer.arch=null", f"model.transformer.pretrained={other}"
    ]  # fmt: skip
    model = validate(SampleAppConfig, compose("sample", overrides)).model
    assert (model.transformer.pretrained, model.transformer.subfolder) == (str(other), None)
    assert (model.vae.pretrained, model.vae.subfolder) == (str(pipeline_dir), "vae")
    got = _params(build_transformer(model.transformer))
    want = _params(build_transformer(TransformerConfig(seed=9)))
    assert all(torch.equal(got[k], want[k]) for k in want)
    # Idempotent: validating the resolved config again (as a resume does with config.yaml) changes nothing.
    from dataclasses import asdict

    assert validate(ModelConfig, asdict(model)) == model


def test_a_folder_missing_a_part_fails_naming_the_part_and_path(pipeline_dir, tmp_path):
    broken = tmp_path / "no-vae"
    shutil.copytree(pipeline_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(
        ConfigError, match=rf"model\.pretrained: .*no vae/ \(the VAE\): {broken}/vae is missing"
    ):
        _validate_model(broken)
    # The part taken from elsewhere need not be in the folder.
    model = ModelConfig(
        pretrained=str(broken), vae=VAEConfig(arch=None, pretrained=str(pipeline_dir), subfolder="vae")
    )
    assert model.vae.pretrained == str(pipeline_dir)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ValueError, match=r"no tokenizer/ \(the text encoder's tokenizer\)"):
        ModelConfig(pretrained=str(broken), vae=model.vae)
    with pytest.raises(ValueError, match="pretrained: is not a folder"):
        ModelConfig(pretrained=str(tmp_path / "missing" / "Wan2.1-T2V-1.3B-Diffusers"))


def _validate_model(path: Path):
    """The train config as the command line `model.pretrained=<path>` composes it."""
    return validate(
        TrainConfig, compose("train", [f"model.pretrained={path}", "data.source=x", "data.cache_dir=y"])
    )


def test_a_hub_id_is_kept_and_fails_at_load_naming_part_and_path(monkeypatch):
    """No network here: the hub id passes validation unchanged and loading it offline fails naming the key."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ModelConfig(pretrained="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert (model.vae.pretrained, model.vae.subfolder) == ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae")
    with pytest.raises(
        OSError, match=r"model\.vae\.pretrained='Wan-AI/Wan2.1-T2V-1.3B-Diffusers' \(subfolder='vae'\)"
    ):
        build_vae(model.vae)
