"""LoRA (train.lora, models.lora) on the tiny Wan, on CPU: only adapters train; ZeRO-2 and ZeRO-3 agree;
resume is exact; the exported adapter loads into diffusers' `WanPipeline` and samples what our sampler
does; the original Wan / ComfyUI file has the original module names and maps back through diffusers'
own converter."""

import pytest
import safetensors.torch
import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from test_train import (  # noqa: F401  (cache: the module's latent cache)
    assert_same_steps,
    cache,
    interrupted_copy,
    make_cfg,
    records,
)

from models import lora
from models.config import AttentionConfig, TransformerConfig
from models.transformer import build_transformer

LORA = ["train.lora.rank=4", "train.lora.alpha=8", "train.lr=1e-2", "eval.every=0", "sample.every=0"]


def latest(run_dir):
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def lora_model(rank=4, alpha=8.0, seed=3) -> torch.nn.Module:
    """The tiny Wan with an adapter whose lora_B is random (a fresh one is zero and changes nothing)."""
    model = build_transformer(TransformerConfig(arch="tiny"))
    lora.apply_lora(model, rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_lora_trains_only_the_adapter_and_zero3_matches_zero2(cache, tmp_path):  # noqa: F811
    """Two LoRA steps under ZeRO-2 and ZeRO-3 (with activation checkpointing keeping the attention, VMoBA)
    give the same adapter; the base weights in the merged export are the initial ones bitwise except
    where the adapter merges in, and the frozen modules (norms, embeddings) are untouched."""
    from train import train

    initial = build_transformer(make_cfg(cache).model.transformer).state_dict()
    runs = {
        "zero2": ["deepspeed=zero2", "train.lora.merge_on_export=true"],
        "zero3": [
            "deepspeed=zero3", "train.activation_checkpointing=true", "train.keep_attention=true",
        ],
    }  # fmt: skip
    adapters = {}
    for name, overrides in runs.items():
        train(make_cfg(cache, *LORA, *overrides, "train.steps=2"), tmp_path / name, name=name)
        ckpt = latest(tmp_path / name)
        adapters[name] = safetensors.torch.load_file(ckpt / "lora" / lora.DIFFUSERS_FILE)
        assert (ckpt / "lora" / lora.ORIGINAL_FILE).is_file()
    assert not (latest(tmp_path / "zero3") / "transformer").exists()  # no merge asked: the adapter only
    # The trained module (DeepSpeed's state): every base weight bitwise the initial one; the optimizer's
    # fp32 partition holds the adapter parameters only.
    ds = latest(tmp_path / "zero2") / "deepspeed"
    module = torch.load(ds / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    base = {k.replace(".base_layer.", "."): v for k, v in module.items() if ".lora_" not in k}
    assert sorted(base) == sorted(initial) and all(torch.equal(base[k], initial[k]) for k in initial)
    optim = torch.load(ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    adapter_numel = sum(v.numel() for k, v in module.items() if ".lora_" in k)
    assert [t.numel() for t in optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]] == [
        adapter_numel
    ]
    a, b = adapters["zero2"], adapters["zero3"]
    assert sorted(a) == sorted(b) and len(a) == 2 * 10 * 3  # A and B, 10 targets, 3 blocks
    assert all(k.startswith("transformer.blocks.") for k in a)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in a.items())  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)

    merged = build_transformer(
        TransformerConfig(arch=None, pretrained=str(latest(tmp_path / "zero2") / "transformer"))
    ).state_dict()
    assert sorted(merged) == sorted(initial)
    targets = {f"blocks.{i}.{t}.weight" for i in range(3) for t in lora.WAN_TARGETS}
    changed = {k for k in initial if not torch.equal(initial[k], merged[k])}
    assert changed and changed <= targets  # biases, norms, embeddings and the rest are the base's bitwise
    state = {k.removeprefix("transformer."): v for k, v in a.items()}
    key = "blocks.1.attn1.to_q"
    delta = 8 / 4 * state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
    torch.testing.assert_close(merged[f"{key}.weight"], initial[f"{key}.weight"] + delta)


def test_lora_engine_optimises_only_the_adapter(cache):  # noqa: F811
    """The optimizer the engine builds holds the adapter parameters only (no state for the frozen base)."""
    from training.engine import build_optimizer
    from training.stack import build_stack

    cfg = make_cfg(cache, *LORA)
    stack = build_stack(
        cfg.model, cfg.attention, cfg.objective, torch.device("cpu"), precision="fp32", train=cfg.train,
        encoders=False,
    )  # fmt: skip
    trainable = {n for n, p in stack.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapters = {id(p) for n, p in stack.transformer.named_parameters() if n in trainable}
    optimizer = build_optimizer([p for p in stack.transformer.parameters() if p.requires_grad], cfg)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == adapters
    assert len(adapters) == 2 * 10 * 3  # A and B of 10 targets in 3 blocks


def test_lora_resume_gives_the_uninterrupted_losses(cache, tmp_path):  # noqa: F811
    from train import train

    overrides = (*LORA, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=3")
    full = tmp_path / "full"
    train(make_cfg(cache, *overrides), full)
    resumed = tmp_path / "resumed"
    interrupted_copy(full, resumed)
    train(make_cfg(cache, *overrides), resumed)
    assert_same_steps(records(full / "metrics.jsonl"), records(resumed / "metrics.jsonl"))
    x = safetensors.torch.load_file(full / "checkpoints/step_000004/lora" / lora.DIFFUSERS_FILE)
    y = safetensors.torch.load_file(resumed / "checkpoints/step_000004/lora" / lora.DIFFUSERS_FILE)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_original_keys_round_trip_and_match_diffusers_converter(tmp_path):
    model = lora_model()
    state = lora.adapter_state_dict(model)
    original = lora.to_original(state, scale=2.0)
    # The original Wan module names, with the shapes of the original Wan Linear layers they adapt.
    wan_shapes = {
        "self_attn.q": (48, 48), "self_attn.k": (48, 48), "self_attn.v": (48, 48), "self_attn.o": (48, 48),
        "cross_attn.q": (48, 48), "cross_attn.k": (48, 48), "cross_attn.v": (48, 48),
        "cross_attn.o": (48, 48), "ffn.0": (64, 48), "ffn.2": (48, 64),
    }  # fmt: skip
    expected = {
        f"diffusion_model.blocks.{i}.{m}.lora_{ab}.weight": (4, shape[1]) if ab == "A" else (shape[0], 4)
        for i in range(3)
        for m, shape in wan_shapes.items()
        for ab in "AB"
    }
    assert {k: tuple(v.shape) for k, v in original.items()} == expected
    back = lora.from_original(original, scale=2.0)
    assert sorted(back) == sorted(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=1e-7)
    # diffusers' converter maps our original-format file to our diffusers keys, alpha/rank folded in.
    converted = _convert_non_diffusers_wan_lora_to_diffusers(dict(original))
    assert sorted(converted) == sorted(f"transformer.{k}" for k in state)
    for k, v in state.items():
        torch.testing.assert_close(converted[f"transformer.{k}"], v * 2 if ".lora_B." in k else v)


@pytest.mark.parametrize("attention", ["vmoba", "full"])
def test_exported_adapter_in_wanpipeline_gives_our_frames(tmp_path, attention):
    """Our sampler (models.lora.load_adapter) and diffusers' WanPipeline with `load_lora_weights`, both with
    our attention processors (VMoBA or full) calling through the peft-wrapped projections, from the same
    noise, text embeddings and one Euler step (sigma 1 -> 0: the one schedule both grids share), give the
    same frames; so do both adapter files."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from models.attention import install_attention
    from models.encoders import TextEncoderConfig, VAEConfig, build_text_encoder, build_vae
    from training.config import GenerationConfig, ObjectiveConfig
    from training.model_fn import make_model_fn
    from training.objective import FlowMatching
    from training.sampling import PromptSampler

    model = lora_model()
    lora.save_adapter(lora.adapter_state_dict(model), lora.adapter_metadata(model), tmp_path / "lora")
    vae, text_encoder = build_vae(VAEConfig()), build_text_encoder(TextEncoderConfig())
    gen = GenerationConfig(prompts=["a red ball"], steps=1, frames=5, height=32, width=32)
    objective = FlowMatching(ObjectiveConfig())
    sampler = PromptSampler(gen, objective, text_encoder, vae, torch.device("cpu"), transformer=model)

    ours = {}
    for name in (lora.DIFFUSERS_FILE, lora.ORIGINAL_FILE):
        base = build_transformer(TransformerConfig(arch="tiny")).eval()
        lora.load_adapter(base, tmp_path / "lora" / name)
        # The sampler's model is the base + adapter from the file, with our attention processors on attn1.
        cfg = AttentionConfig(type=attention, block_2d=[1, 2], block_3d=[2, 1, 2])
        controller = install_attention(base, cfg)
        ours[name] = sampler.generate(make_model_fn(base, "wan", 1000, torch.float32), controller)

    transformer = build_transformer(TransformerConfig(arch="tiny")).eval()
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )  # fmt: skip
    pipe.load_lora_weights(tmp_path / "lora")
    install_attention(transformer, cfg)
    frames = pipe(
        prompt_embeds=sampler.emb[:1], num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
        num_frames=5, latents=sampler.noise[:1].clone(), output_type="pt",
    ).frames  # fmt: skip
    theirs = frames.permute(0, 2, 1, 3, 4) * 2 - 1  # [B, F, 3, H, W] in [0, 1] -> [B, 3, F, H, W] in [-1, 1]
    torch.testing.assert_close(ours[lora.DIFFUSERS_FILE], theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[lora.ORIGINAL_FILE], ours[lora.DIFFUSERS_FILE], rtol=0, atol=1e-5)
    # The adapter matters: the base model's frames differ.
    base = build_transformer(TransformerConfig(arch="tiny")).eval()
    plain = sampler.generate(make_model_fn(base, "wan", 1000, torch.float32), install_attention(base, cfg))
    assert (plain - theirs).abs().max() > 1e-3


def test_load_adapter_scale_scales_the_update(tmp_path):
    """`load_adapter(file, scale=s)` (sample.py's `lora_scale`) applies `W + s (alpha / r) B A`: the same
    transformer output as the adapter with lora_B scaled by s, loaded at scale 1; scale 0 is the base."""
    model = lora_model()
    state, metadata = lora.adapter_state_dict(model), lora.adapter_metadata(model)
    lora.save_adapter(state, metadata, tmp_path / "a")
    halved = {k: v * 0.5 if ".lora_B." in k else v for k, v in state.items()}
    lora.save_adapter(halved, metadata, tmp_path / "b")
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))

    def out(file, scale):
        m = build_transformer(TransformerConfig(arch="tiny")).eval()
        if file is not None:
            lora.load_adapter(m, file, scale)
        with torch.no_grad():
            return m(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)[0]

    scaled = out(tmp_path / "a" / lora.DIFFUSERS_FILE, 0.5)
    torch.testing.assert_close(scaled, out(tmp_path / "b" / lora.DIFFUSERS_FILE, 1.0), rtol=0, atol=1e-6)
    assert (scaled - out(tmp_path / "a" / lora.DIFFUSERS_FILE, 1.0)).abs().max() > 1e-4
    torch.testing.assert_close(out(tmp_path / "a" / lora.ORIGINAL_FILE, 0.0), out(None, 1.0), rtol=0, atol=0)


def test_bench_train_lora_cpu_smoke_run(launch_env):
    """scripts/bench_train.py --lora R on CPU (gloo, ZeRO-2, tiny Wan): it trains the adapters only and
    still writes a row per attention."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
    args = ["--arch", "tiny", "--grid", "4x8x8", "--text-len", "16", "--warmup", "1", "--steps", "1"]
    run = subprocess.run(
        [sys.executable, str(script), *args, "--lora", "4"],
        capture_output=True, text=True, timeout=300, env=launch_env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    adapters = 3 * 4 * (8 * (48 + 48) + (48 + 64) + (64 + 48))  # 3 blocks, rank 4: A [4, in] + B [out, 4]
    assert f"LoRA rank 4: {adapters:,} trained parameters" in run.stdout + run.stderr
    rows = [r.split("|")[1].strip() for r in run.stdout.splitlines() if r.startswith("| ")]
    assert "full" in rows and any(r.startswith("vmoba") for r in rows)


def test_sample_with_lora_from_a_run_checkpoint_or_file(cache, tmp_path):  # noqa: F811
    """sample.py's `lora=` takes a LoRA run dir, a checkpoint dir, its lora/ dir or the file; it samples the
    base + adapter with VMoBA; a path without an adapter fails naming what it expected."""
    import decord
    from hydra import compose, initialize_config_dir
    from test_train import ROOT, SMALL_BLOCKS

    from sample import generate, resolve_lora_file
    from train import train
    from training.config import SampleAppConfig, validate

    run = tmp_path / "run"
    train(make_cfg(cache, *LORA, "train.steps=1"), run)
    file = latest(run) / "lora" / lora.DIFFUSERS_FILE
    for path in (run, run / "checkpoints", latest(run), latest(run) / "lora", file):
        assert resolve_lora_file(path) == file
    with pytest.raises(FileNotFoundError, match="lora=.*trained with train.lora.rank > 0 and ema.enabled"):
        resolve_lora_file(run, use_ema=True)
    overrides = [f"lora={run}", "lora_scale=0.8", "steps=2", "frames=5", "height=32", "width=32"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = validate(
            SampleAppConfig,
            compose(
                config_name="sample", overrides=[*overrides, *SMALL_BLOCKS, f"output_dir={tmp_path / 'o'}"]
            ),
        )
    paths = generate(cfg)
    reader = decord.VideoReader(str(paths["prompt_00"]))
    assert len(reader) == 5 and reader[0].shape == (32, 32, 3)
