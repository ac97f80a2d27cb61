"""models/: config validation, builders (arch + save/from_pretrained), Wan attention processors, and a CPU
smoke run of scripts/bench_train.py."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.transformers import transformer_wan
from hydra import compose, initialize_config_dir

import vmoba
from models.attention import FullAttention, VMoBAAttention, install_attention
from models.checkpointing import enable_checkpointing
from models.config import AttentionConfig, ModelConfig, TransformerConfig
from models.encoders import TEXT_ARCHS, VAE_ARCHS
from models.families import ARCHS
from models.transformer import build_transformer
from models.wan_block import FusedWanTransformerBlock, fuse_wan_blocks
from schema import ConfigError, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Tiny demo grid blocks (configs/attention/vmoba.yaml): several blocks in every partition of 5x8x8.
TINY_BLOCKS = dict(block_1d=1, block_2d=(2, 4), block_3d=(2, 4, 4), granularity="token")
ALL_BLOCKS = dict(selection="topk", topk_1d=64, topk_2d=64, topk_3d=64)


def _inputs(shape=(2, 4, 5, 16, 16), seed=0, dtype=torch.float64):
    """Random Wan inputs: latents [B, C, F, H, W], timesteps [B], text embeddings [B, S, 32]."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g, dtype=dtype)
    text = torch.randn(shape[0], 7, 32, generator=g, dtype=dtype)
    t = torch.rand(shape[0], generator=g, dtype=dtype) * 1000
    return latents, t, text


def _wan(dtype=torch.float64):
    return build_transformer(TransformerConfig(arch="tiny")).to(dtype)


def _run(model, inputs):
    latents, t, text = inputs
    return model(latents, t, text).sample


# ---------------------------------------------------------------- configs


def test_attention_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^type: must be one of \['full', 'vmoba'\], got 'sparse'"):
        AttentionConfig(type="sparse")
    with pytest.raises(ValueError, match=r"^backend: must be one of .*flash_varlen.*got 'cuda'"):
        AttentionConfig(backend="cuda")
    with pytest.raises(ConfigError, match=r"^threshold must be in \(0, 1\]"):
        validate(AttentionConfig, {"threshold": 1.5})
    with pytest.raises(ConfigError, match=r"^blok_1d: Key 'blok_1d' not in 'AttentionConfig'"):
        validate(AttentionConfig, {"blok_1d": 2})


def test_attention_config_to_vmoba_keeps_every_field():
    cfg = validate(AttentionConfig, {"type": "vmoba", "block_2d": [2, 4], "scope": "head", "threshold": 0.3})
    v = cfg.to_vmoba()
    assert type(v) is vmoba.VMoBAConfig
    assert (v.block_2d, v.scope, v.threshold) == ((2, 4), "head", 0.3)


def test_transformer_and_model_config_errors_name_the_key():
    """Keys relative to the schema's own node; `validate` prefixes the node's path."""
    with pytest.raises(ValueError, match=r"^arch: must be one of \[.*'tiny'.*\], got 'huge'"):
        TransformerConfig(arch="huge")
    with pytest.raises(ValueError, match=r"^dtype: must be one of .*, got 'int8'"):
        TransformerConfig(dtype="int8")
    with pytest.raises(ValueError, match=r"^arch: exactly one of arch .* and pretrained"):
        TransformerConfig(arch="tiny", pretrained="/some/dir")
    with pytest.raises(ValueError, match=r"^arch: exactly one of arch"):
        TransformerConfig(arch=None)
    with pytest.raises(ValueError, match=r"^family: must be one of \['wan', 'cogvideox'\], got 'sd3'"):
        ModelConfig(family="sd3")
    with pytest.raises(
        ConfigError,
        match=r"^transformer\.arch: must be a 'cogvideox' architecture .*\['cogvideox-tiny'.*got 'tiny'",
    ):
        validate(ModelConfig, {"family": "cogvideox"})  # errors name the key relative to the node given
    with pytest.raises(ConfigError, match=r"^transformer\.dtype: must be one of"):
        validate(ModelConfig, {"transformer": {"dtype": "int8"}})


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
def test_model_yaml_validates(name):
    with initialize_config_dir(str(CONFIGS / "model"), version_base=None):
        cfg = validate(ModelConfig, compose(config_name=name))
    arch = cfg.transformer.arch
    assert ARCHS[arch].family == cfg.family
    # The transformer's latent channels and text width match the configured VAE and text encoder.
    kwargs = ARCHS[arch].build.keywords
    z_dim = VAE_ARCHS[cfg.vae.arch].get(
        "z_dim", inspect.signature(AutoencoderKLWan).parameters["z_dim"].default
    )
    assert kwargs["in_channels"] == kwargs["out_channels"] == z_dim
    assert (
        kwargs.get("text_dim", kwargs.get("text_embed_dim")) == TEXT_ARCHS[cfg.text_encoder.arch]["d_model"]
    )
    if cfg.family == "cogvideox":  # CogVideoX needs prompts of exactly max_text_seq_length tokens
        assert cfg.text_encoder.max_length == kwargs["max_text_seq_length"]


def test_attention_yamls_compose_with_their_semantics():
    with initialize_config_dir(str(CONFIGS), version_base=None):
        load = {
            n: validate(AttentionConfig, compose(overrides=[f"+attention={n}"]).attention)
            for n in ("full", "vmoba", "vmoba_global", "vmoba_topk", "vmoba_wan2.1", "vmoba_wan2.1_480p")
        }
    assert load["full"].type == "full"
    original = load["vmoba"]  # the original VMoBA code's semantics
    assert (original.type, original.selection, original.threshold, original.scope, original.granularity) == (
        "vmoba",
        "threshold",
        0.25,
        "query",
        "token",
    )
    assert load["vmoba_global"].scope == "head" and load["vmoba_global"].threshold == 0.25
    assert (load["vmoba_topk"].selection, load["vmoba_topk"].granularity) == ("topk", "block")
    assert load["vmoba_wan2.1"].block_3d == (4, 4, 8)
    # Each real-resolution config fits its grid: no padded grid, >= 90% of 128-token kernel tiles
    # filled, top-k about 25% of the blocks.
    for name, grid in (("vmoba_wan2.1", (24, 36, 64)), ("vmoba_wan2.1_480p", (21, 30, 52))):
        cfg = load[name].to_vmoba()
        for kind in ("1d", "2d", "3d"):
            layout = vmoba.block_layout(grid, kind, cfg.block_for(kind), pad_to=128)
            assert tuple(c * n for c, n in zip(layout.cube, layout.counts)) == grid, (name, kind)
            assert layout.num_tokens / layout.length >= 0.9, (name, kind)
            assert 0.2 <= cfg.topk_for(kind) / layout.num_blocks <= 0.3, (name, kind)
    # The tiny block sizes leave several blocks in every partition of the demo grid (5x8x8 tokens).
    for kind in ("1d", "2d", "3d"):
        assert vmoba.block_layout((5, 8, 8), kind, original.block_for(kind)).num_blocks >= 4


# ---------------------------------------------------------------- builders


def test_tiny_arch_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_transformer(TransformerConfig()), build_transformer(TransformerConfig())
    c = build_transformer(TransformerConfig(seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    latents, t, text = _inputs(shape=(1, 4, 5, 16, 16), dtype=torch.float32)
    assert a(latents, t, text).sample.shape == latents.shape


@pytest.mark.parametrize("subfolder", [None, "transformer"])
def test_save_pretrained_roundtrip_gives_equal_outputs(tmp_path, subfolder):
    model = build_transformer(TransformerConfig(seed=3))
    model.save_pretrained(tmp_path / (subfolder or ""))
    loaded = build_transformer(TransformerConfig(arch=None, pretrained=str(tmp_path), subfolder=subfolder))
    assert type(loaded) is type(model)
    inputs = _inputs(dtype=torch.float32)
    torch.testing.assert_close(_run(loaded, inputs), _run(model, inputs), rtol=0, atol=0)
    half = build_transformer(
        TransformerConfig(arch=None, pretrained=str(tmp_path), subfolder=subfolder, dtype="bfloat16")
    )
    assert half.proj_out.weight.dtype == torch.bfloat16


def test_missing_pretrained_names_the_key(tmp_path):
    with pytest.raises(OSError, match=r"model\.transformer\.pretrained=.*nowhere"):
        build_transformer(TransformerConfig(arch=None, pretrained=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------- fused Wan blocks


@pytest.mark.parametrize("cross_attn_norm", [False, True])
@pytest.mark.parametrize("per_token_temb", [False, True])  # Wan 2.1 / Wan 2.2 TI2V modulation
def test_fused_wan_block_is_bitwise_the_diffusers_block(cross_attn_norm, per_token_temb):
    """On the CPU the fused block runs the same ops eagerly: outputs and every gradient bitwise equal."""
    torch.manual_seed(0)
    plain = transformer_wan.WanTransformerBlock(48, 64, 2, cross_attn_norm=cross_attn_norm)
    with torch.no_grad():  # diffusers inits norm2 to 1 / 0: make the affine path matter
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = transformer_wan.WanTransformerBlock(48, 64, 2, cross_attn_norm=cross_attn_norm)
    fused.load_state_dict(plain.state_dict())
    assert fuse_wan_blocks(fused) == 1 and type(fused) is FusedWanTransformerBlock
    x, context = torch.randn(2, 10, 48), torch.randn(2, 7, 48)
    temb = torch.randn(2, 10, 6, 48) if per_token_temb else torch.randn(2, 6, 48)
    weight = torch.randn(2, 10, 48)
    results = []
    for block in (plain, fused):
        leaves = [t.clone().requires_grad_() for t in (x, context, temb)]
        out = block(*leaves, None)
        grads = torch.autograd.grad((out * weight).sum(), [*leaves, *block.parameters()])
        results.append((out, *grads))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_build_transformer_fuses_every_wan_block_and_keeps_the_outputs():
    model, inputs = _wan(torch.float32), _inputs(dtype=torch.float32)
    assert all(type(b) is FusedWanTransformerBlock for b in model.blocks)
    fused = _run(model, inputs)
    assert fuse_wan_blocks(model, fused=False) == len(model.blocks)  # back to diffusers' forward
    assert all(type(b) is transformer_wan.WanTransformerBlock for b in model.blocks)
    assert torch.equal(_run(model, inputs), fused)
    assert fuse_wan_blocks(model) == len(model.blocks) and fuse_wan_blocks(model) == 0


# ---------------------------------------------------------------- Wan processors


def test_full_processor_equals_diffusers_wan_processor():
    model, inputs = _wan(), _inputs()
    expected = _run(model, inputs)  # diffusers' own WanAttnProcessor everywhere
    install_attention(model, AttentionConfig(type="full"))
    assert all(isinstance(b.attn1.processor.kernel, FullAttention) for b in model.blocks)
    assert all(type(b.attn2.processor) is transformer_wan.WanAttnProcessor for b in model.blocks)
    torch.testing.assert_close(_run(model, inputs), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_vmoba_with_every_block_selected_equals_full(granularity):
    model, inputs = _wan(), _inputs()
    install_attention(model, AttentionConfig(type="full"))
    full = _run(model, inputs)
    install_attention(
        model, AttentionConfig(type="vmoba", **{**TINY_BLOCKS, **ALL_BLOCKS, "granularity": granularity})
    )
    torch.testing.assert_close(_run(model, inputs), full, rtol=0, atol=1e-10)


def test_sparse_vmoba_matches_hand_built_reference(monkeypatch):
    """Diffusers' own Wan processor with its self-attention call replaced by the VMoBA reference backend
    (layer index = order of the call) must equal the installed VMoBA processors, and differ from full."""
    cfg = AttentionConfig(type="vmoba", **TINY_BLOCKS)
    model, inputs = _wan(), _inputs()
    full = _run(model, inputs)
    grid, calls = (5, 8, 8), []
    dispatch = transformer_wan.dispatch_attention_fn

    def reference_self_attention(query, key, value, **kwargs):
        if key.shape[1] != query.shape[1]:  # cross-attention: untouched
            return dispatch(query, key, value, **kwargs)
        calls.append(len(calls))
        return vmoba.vmoba_attention(
            query, key, value, grid, cfg.to_vmoba(), layer_idx=calls[-1], backend="reference"
        )

    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", reference_self_attention)
    expected = _run(model, inputs)
    monkeypatch.undo()
    assert calls == [0, 1, 2]
    install_attention(model, cfg)
    out = _run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - full).abs().max() > 1e-3


def test_grid_hook_follows_non_square_inputs():
    model = _wan()
    ctrl = install_attention(model, AttentionConfig(type="vmoba", **TINY_BLOCKS))
    for shape, grid in (((1, 4, 3, 8, 12), (3, 4, 6)), ((1, 4, 2, 16, 10), (2, 8, 5))):
        latents, t, text = _inputs(shape=shape)
        assert model(hidden_states=latents, timestep=t, encoder_hidden_states=text).sample.shape == shape
        assert ctrl.grid == grid


def test_gradients_with_checkpointing_match_and_reach_every_weight():
    """Activation checkpointing recomputes the same VMoBA selection: gradients equal the plain run."""
    inputs = _inputs(shape=(1, 4, 5, 16, 16))
    weight = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for checkpointing in (False, True):
        model = _wan()
        install_attention(model, AttentionConfig(type="vmoba", **TINY_BLOCKS))
        if checkpointing:
            model.enable_gradient_checkpointing()
        (_run(model, inputs) * weight).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    plain, ckpt = grads
    for name, g in plain.items():
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(ckpt[name], g, rtol=1e-9, atol=1e-12)
    assert all(plain[f"blocks.{i}.attn1.to_q.weight"].abs().sum() > 0 for i in range(3))


@pytest.mark.parametrize("attention", ["vmoba", "full"])
def test_keep_attention_runs_each_kernel_once_with_the_same_gradients(attention, attend_calls):
    """keep_attention: the checkpoint's recompute reuses the forward's attention outputs (the kernel runs
    once per block instead of twice), each forward's own, and the gradients are plain checkpointing's;
    with keep_blocks=2 only the first two of the three blocks keep theirs."""
    cfg = (
        AttentionConfig(type="vmoba", **TINY_BLOCKS) if attention == "vmoba" else AttentionConfig(type="full")
    )
    kernel = VMoBAAttention if attention == "vmoba" else FullAttention
    calls = attend_calls(kernel)
    seed = int(torch.randint(1000, ()))
    first, second = (
        _inputs(shape=(1, 4, 5, 16, 16), seed=seed),
        _inputs(shape=(1, 4, 5, 16, 16), seed=seed + 1),
    )
    weight = torch.randn(first[0].shape, dtype=torch.float64)
    runs = []
    for keep, keep_blocks in ((False, None), (True, None), (True, 2)):
        model = _wan()
        install_attention(model, cfg)
        enable_checkpointing(model, keep, keep_blocks)
        calls.clear()
        # Two forwards, then one backward through both: each recompute must take its own forward's output.
        loss = (_run(model, first) * weight).sum() + (_run(model, second) * weight).sum()
        loss.backward()
        runs.append(({n: p.grad for n, p in model.named_parameters()}, list(calls)))
    (plain, plain_calls), (kept, kept_calls), (some, some_calls) = runs
    assert sorted(plain_calls) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # forwards, then the recomputes
    assert kept_calls == [0, 1, 2, 0, 1, 2]  # the forwards only
    assert sorted(some_calls) == [0, 0, 1, 1, 2, 2, 2, 2]  # the last block recomputes its attention
    for name, g in plain.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(kept[name], g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(some[name], g, rtol=1e-9, atol=1e-12)


def test_stats_per_layer_and_recall():
    model, inputs = _wan(), _inputs(shape=(1, 4, 5, 16, 16))
    ctrl = install_attention(model, AttentionConfig(type="vmoba", **TINY_BLOCKS))
    _run(model, inputs)
    stats = ctrl.stats()
    assert {f"density/layer_{i:02d}" for i in range(3)} <= set(stats)
    assert not any(k.startswith("recall") for k in stats)
    assert all(
        0 < stats[f"density/layer_{i:02d}"] < 1 and not stats[f"density/layer_{i:02d}"].requires_grad
        for i in range(3)
    )
    ctrl.measure_recall = True
    rng = torch.random.get_rng_state()
    _run(model, inputs)
    recall = {k: v for k, v in ctrl.stats().items() if k.startswith("recall/")}
    assert sorted(recall) == [f"recall/layer_{i:02d}" for i in range(3)]
    assert all(0 < v < 1 for v in recall.values())
    _run(model, inputs)  # the query sample is seeded per layer: repeatable, global RNG untouched
    assert all(torch.equal(ctrl.stats()[k], v) for k, v in recall.items())
    assert torch.equal(torch.random.get_rng_state(), rng)

    ctrl = install_attention(model, AttentionConfig(type="vmoba", **{**TINY_BLOCKS, **ALL_BLOCKS}))
    ctrl.measure_recall = True
    _run(model, inputs)
    assert all(abs(ctrl.stats()[f"recall/layer_{i:02d}"] - 1) < 1e-6 for i in range(3))

    ctrl = install_attention(model, AttentionConfig(type="full"))  # switches in place
    ctrl.measure_recall = True
    _run(model, inputs)
    assert ctrl.stats() == {
        f"{n}/layer_{i:02d}": torch.tensor(1.0) for n in ("density", "recall") for i in range(3)
    }


def test_dense_first_steps_follow_the_denoising_step():
    model, inputs = _wan(), _inputs(shape=(1, 4, 5, 16, 16))
    install_attention(model, AttentionConfig(type="full"))
    full = _run(model, inputs)
    ctrl = install_attention(model, AttentionConfig(type="vmoba", dense_first_steps=2, **TINY_BLOCKS))
    assert all(isinstance(b.attn1.processor.kernel, VMoBAAttention) for b in model.blocks)
    ctrl.set_denoising_step(1)
    ctrl.measure_recall = True
    torch.testing.assert_close(_run(model, inputs), full, rtol=0, atol=1e-10)
    assert all(ctrl.stats()[f"{n}/layer_{i:02d}"] == 1 for n in ("density", "recall") for i in range(3))
    ctrl.set_denoising_step(2)
    assert (_run(model, inputs) - full).abs().max() > 1e-3


def test_bench_train_cpu_smoke_run_switches_attention_on_one_engine(launch_env):
    """scripts/bench_train.py on CPU (gloo, ZeRO-2, tiny Wan): a row per attention config, and each VMoBA
    row's density is its fixed top-k density on a 4x8x8 grid: mean(2/4, 3/8, 4/8), then with a --variant."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
    args = ["--arch", "tiny", "--grid", "4x8x8", "--text-len", "16", "--warmup", "1", "--steps", "1"]
    args += ["--keep-attention", "2"]  # checkpointing that reuses 2 of 3 blocks' attention, under DeepSpeed
    args += ["--variant", "attention.topk_3d=2 attention.topk_1d=1"]
    run = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, env=launch_env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {
        r.split("|")[1].strip(): r.split("|")[2:-1] for r in run.stdout.splitlines() if r.startswith("| ")
    }
    variant = "vmoba (vmoba_topk: attention.topk_3d=2 attention.topk_1d=1)"
    assert set(rows) == {"attention", "---", "vmoba (vmoba_topk)", variant, "full"}
    assert float(rows["vmoba (vmoba_topk)"][3]) == pytest.approx((2 / 4 + 3 / 8 + 4 / 8) / 3, abs=1e-3)
    assert float(rows[variant][3]) == pytest.approx((1 / 4 + 3 / 8 + 2 / 8) / 3, abs=1e-3)
    assert float(rows["full"][3]) == 1.0 and float(rows["full"][0]) > 0
    assert "full/VMoBA step-time ratio" in run.stdout and "keep_attention=first 2 blocks" in run.stdout
