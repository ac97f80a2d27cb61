"""Checkpoints as whole diffusers pipelines (training.export): `WanPipeline.from_pretrained(<checkpoint>)`
loads them and generates the frames our sampler generates; the shared parts are hard links to one copy
per run; the sampler's schedules against diffusers' schedulers; the model card."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from omegaconf import OmegaConf
from test_pretrained import save_tiny_pipeline
from test_train import FAST, cache, make_cfg  # noqa: F401  (cache: test_train's clips and latent cache)

from data.cache import cache_dataset
from models.config import TransformerConfig
from models.encoders import decode_latents
from models.transformer import build_transformer
from schema import compose, validate
from training.config import ObjectiveConfig, TrainConfig
from training.export import PARTS_DIR, export_pipeline, write_model_card
from training.objective import FlowMatching
from training.stack import build_stack

PROMPT, NEGATIVE = "a red ball rolls over green grass", "a dog"


def _config_yaml(*overrides: str) -> str:
    cfg = validate(TrainConfig, compose("train", ["data.source=clips", "data.cache_dir=cache", *overrides]))
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _ours_and_pipelines(checkpoint: Path, model_yaml: str, guidance: float, steps: int = 3):
    """(our latents, WanPipeline's latents, our frames, WanPipeline's frames) for the same noise, prompt and
    UniPC schedule: ours = `FlowMatching.sample(scheduler="unipc")` on the stack built from the run's model
    config and the checkpoint's transformer (full attention, as diffusers' processor computes)."""
    cfg = validate(TrainConfig, OmegaConf.create(model_yaml))
    stack = build_stack(
        cfg.model, validate(type(cfg.attention), {"type": "full"}), cfg.objective, torch.device("cpu"),
        precision="fp32", weights=checkpoint / "transformer",
    )  # fmt: skip
    emb, mask = stack.text_encoder.encode([PROMPT, NEGATIVE])
    noise = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(7))  # 9 frames of 32x32
    ours = FlowMatching(cfg.objective).sample(
        stack.model_fn(), noise, {"text_emb": emb[:1], "text_mask": mask[:1]}, steps, guidance,
        uncond={"text_emb": emb[1:], "text_mask": mask[1:]}, shift=cfg.sample.shift, scheduler="unipc",
    )  # fmt: skip
    pipe = WanPipeline.from_pretrained(checkpoint)
    # The pipeline's own prompt encoding from the exported tokenizer + text encoder equals ours.
    pipe_emb, pipe_neg = pipe.encode_prompt(PROMPT, NEGATIVE, max_sequence_length=emb.shape[1])
    torch.testing.assert_close(pipe_emb, emb[:1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pipe_neg, emb[1:], atol=1e-6, rtol=1e-6)
    run = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=32, num_frames=9, num_inference_steps=steps,
        guidance_scale=guidance, max_sequence_length=emb.shape[1],
    )  # fmt: skip
    theirs = pipe(**run, latents=noise.clone(), output_type="latent").frames
    frames = pipe(**run, latents=noise.clone(), output_type="pt").frames  # [B, F, 3, H, W] in [0, 1]
    our_frames = (decode_latents(stack.vae, ours).permute(0, 2, 1, 3, 4) + 1) / 2
    return ours, theirs, our_frames, frames


def test_a_checkpoint_loads_as_a_wan_pipeline_and_matches_our_unipc_sampler(tmp_path):
    """Random-init tiny encoders (the default model): saved once per run under checkpoints/pipeline/, every
    checkpoint hard-linking them; WanPipeline generates the frames our sampler does (UniPC, CFG 3)."""
    root = tmp_path / "checkpoints"
    config_yaml = _config_yaml("sample.shift=2.0")
    checkpoints = [root / "step_000001", root / "step_000002"]
    for seed, ckpt in zip((3, 4), checkpoints):
        build_transformer(TransformerConfig(seed=seed)).save_pretrained(ckpt / "transformer")
        written = export_pipeline(ckpt, config_yaml, root / PARTS_DIR)
        assert written == [ckpt / "model_index.json", ckpt / "scheduler"]
    index = json.loads((checkpoints[0] / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    scheduler = json.loads((checkpoints[0] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["flow_shift"] == 2.0 and scheduler["prediction_type"] == "flow_prediction"
    # One copy: every part's file in both checkpoints is the same inode as the run's copy.
    for part in ("vae", "text_encoder", "tokenizer"):
        files = sorted(p.relative_to(root / PARTS_DIR / part) for p in (root / PARTS_DIR / part).rglob("*"))
        assert files, part
        for rel in files:
            if (root / PARTS_DIR / part / rel).is_file():
                inodes = {_inode(c / part / rel) for c in checkpoints} | {
                    _inode(root / PARTS_DIR / part / rel)
                }
                assert len(inodes) == 1 and (root / PARTS_DIR / part / rel).stat().st_nlink == 3, rel
    ours, theirs, our_frames, frames = _ours_and_pipelines(checkpoints[1], config_yaml, guidance=3.0)
    assert ours.abs().mean() > 0.1  # a real sample, not zeros
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(frames, our_frames, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def pretrained_run(cache, tmp_path_factory):  # noqa: F811
    """Two training steps from `model.pretrained=<tiny WanPipeline folder>` (a checkpoint per step), with
    a latent cache encoded by that pipeline's VAE and text encoder."""
    from train import train

    tmp = tmp_path_factory.mktemp("pretrained_run")
    pipeline = save_tiny_pipeline(tmp / "Tiny-Wan-Diffusers")
    overrides = [f"model.pretrained={pipeline}", f"++data.cache_dir={tmp / 'cache'}"]
    cfg = make_cfg(cache, *overrides)
    cache_dataset(cfg.model.vae, cfg.model.text_encoder, cfg.data, progress=False)
    cfg = make_cfg(
        cache, *overrides, "train.steps=2", "checkpoint.every=1", "checkpoint.keep=2", "sample.every=0"
    )
    train(cfg, tmp / "run", "pretrained")
    return pipeline, tmp / "run"


def test_training_from_a_pretrained_pipeline_exports_links_to_its_files(pretrained_run):
    pipeline, run = pretrained_run
    checkpoints = run / "checkpoints"
    steps = [checkpoints / "step_000001", checkpoints / "step_000002"]
    weights = "diffusion_pytorch_model.safetensors"
    # No bytes copied: the run's copy and both checkpoints' VAE weights are the source pipeline's inode.
    assert {_inode(s / "vae" / weights) for s in steps} == {_inode(pipeline / "vae" / weights)}
    assert _inode(checkpoints / PARTS_DIR / "text_encoder" / "model.safetensors") == _inode(
        pipeline / "text_encoder" / "model.safetensors"
    )
    card = (steps[1] / "README.md").read_text()
    assert f"| base model | {pipeline} |" in card and "| steps | 2 |" in card
    assert "VMoBA (" in card and "block_2d=[1, 2]" in card and "full (every transformer weight)" in card
    # A complete pipeline from the final checkpoint: loads, and generates a few frames on the CPU.
    pipe = WanPipeline.from_pretrained(steps[1])
    out = pipe(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
               max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="np").frames  # fmt: skip
    assert out.shape == (1, 5, 32, 32, 3) and 0 <= out.min() and out.max() <= 1 and out.std() > 0
    # The trained transformer, not the pipeline's: its weights moved in two steps.
    trained = WanPipeline.from_pretrained(steps[1]).transformer.state_dict()
    base = WanPipeline.from_pretrained(pipeline).transformer.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    # Pruning a checkpoint (rmtree, as Checkpointer does) removes its links only.
    links = (steps[1] / "text_encoder" / "model.safetensors").stat().st_nlink
    shutil.rmtree(steps[0])
    assert (steps[1] / "text_encoder" / "model.safetensors").stat().st_nlink == links - 1
    assert WanPipeline.from_pretrained(steps[1]).text_encoder.config.d_model == 32


def test_our_euler_step_is_diffusers_flow_match_euler_on_our_grid():
    """`sample.scheduler=euler` integrates `FlowMatching.sigmas` (the shifted linspace(1, 0, steps + 1));
    diffusers' FlowMatchEulerDiscreteScheduler given those sigmas takes the same steps."""
    objective = FlowMatching(ObjectiveConfig(shift=3.0))
    steps, noise = 4, torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))

    def model_fn(x, t, cond):  # a velocity that depends on x and t, so every step's inputs matter
        return (x - target) * (1 + t.view(-1, 1, 1, 1, 1))

    ours = objective.sample(model_fn, noise, None, steps)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the grid below is already shifted
    scheduler.set_timesteps(sigmas=objective.sigmas(steps)[:-1].tolist())
    torch.testing.assert_close(scheduler.sigmas, objective.sigmas(steps))
    x = noise.clone()
    for timestep in scheduler.timesteps:
        x = scheduler.step(model_fn(x, (timestep / 1000).expand(1), None), timestep, x, return_dict=False)[0]
    torch.testing.assert_close(x, ours, atol=1e-6, rtol=1e-6)
    # UniPC's flow grid is ours up to 1/num_train_timesteps (and 1e-6 at t = 1): docs/training.md.
    from training.objective import unipc_scheduler

    unipc = unipc_scheduler(3.0, 1000)
    unipc.set_timesteps(steps)
    torch.testing.assert_close(unipc.sigmas, objective.sigmas(steps), atol=1.5e-3, rtol=0)


def test_model_card_has_the_settings_and_both_runs_numbers(tmp_path):
    config = OmegaConf.to_container(OmegaConf.create(_config_yaml("attention=full", "train.steps=7")))
    run, baseline = tmp_path / "run", tmp_path / "baseline"
    for path, loss in ((run, 0.25), (baseline, 0.5)):
        path.mkdir()
        (path / "summary.json").write_text(json.dumps({"final_loss": loss, "tokens_per_s": 1234.5}))
    report = tmp_path / "report.md"
    report.write_text("# VMoBA vs full\n\nspeed-up 2.1x\n")
    export = tmp_path / "export"
    export.mkdir()
    card = write_model_card(export, config, run_dir=run, baseline=baseline, report=report,
                            repo_id="me/tiny-wan").read_text()  # fmt: skip
    assert card.startswith("---\nlibrary_name: diffusers\n") and "# me/tiny-wan" in card
    assert "| steps | 7 |" in card and "full attention (dense SDPA)" in card
    assert "| metric | this run | baseline |" in card and "| final_loss | 0.25 | 0.5 |" in card
    assert "speed-up 2.1x" in card and 'WanPipeline.from_pretrained("me/tiny-wan"' in card
    assert config["data"]["source"] in card
    # No summary yet (a run's checkpoints before it ends): no results section, and no LoRA row without it.
    bare = write_model_card(export, config).read_text()
    assert "## Results" not in bare and "| LoRA |" not in bare
    config["train"]["lora"] = {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}
    assert "| LoRA | rank 8, alpha 16" in write_model_card(export, config).read_text()
