"""scripts/plan_memory.py: exact parameter and activation counts, the H200 check, the parallel terms."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import plan_memory as pm  # noqa: E402

from models.config import TransformerConfig  # noqa: E402
from models.families import family_of  # noqa: E402
from models.transformer import build_transformer  # noqa: E402


def test_parameter_count_is_the_real_models():
    model = build_transformer(TransformerConfig(arch="tiny", dtype="float32"))
    shape = pm.model_shape("tiny")
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.block_params == sum(p.numel() for p in family_of(model).blocks(model)[0].parameters())


def _saved_in_block_on_cpu(grid, text_len=16):
    """Bytes the tiny model's one block saves in a real CPU bf16 forward: counted here with hooks of
    the test's own (distinct storages, parameters excluded), the plan's stand-in attention installed."""
    model = pm.load_model("tiny", device="cpu", num_layers=1).to(torch.bfloat16)
    family = family_of(model)
    family.prepare(model)  # the fused Wan block, as the plan (and training) runs it
    block = family.blocks(model)[0]
    block.attn1.set_processor(family.processor(pm.stand_in_kernel))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, inside = {}, []
    block.register_forward_pre_hook(lambda m, a: inside.append(True) and None)
    block.register_forward_hook(lambda m, a, o: inside.clear())  # returns None: the output stands

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside and ptr not in params:
            storages[ptr] = (t.untyped_storage().nbytes(), t.untyped_storage())  # held: no address reuse
        return t

    cfg = model.config
    T, H, W = grid
    x = torch.randn(1, cfg.in_channels, T, 2 * H, 2 * W).bfloat16()
    text = torch.randn(1, text_len, cfg.text_dim).bfloat16()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), pm._gpu_sdpa():
        model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)
    return sum(size for size, _ in storages.values())


def test_block_activation_count_matches_a_real_cpu_forward():
    act = pm.activation_profile("tiny", text_len=16, compiled=False, device="cpu")
    for grid in [(2, 4, 6), (3, 4, 6)]:
        tokens = grid[0] * grid[1] * grid[2]
        expected = _saved_in_block_on_cpu(grid)
        assert act.block_saved_tok * tokens + act.block_saved_const == pytest.approx(expected)
    # The meta device counts the same bytes without running the ops.
    meta = pm.activation_profile("tiny", text_len=16, compiled=False, device="meta")
    assert meta.block_saved_tok == act.block_saved_tok and meta.block_saved_const == act.block_saved_const


def test_check_against_measurements_passes(capsys):
    assert pm.main(["--check"]) == 0
    assert "221,184" in capsys.readouterr().out


def test_sequence_parallel_halves_block_activations():
    one = pm.estimate("wan2.1-1.3b", 110_592, pm.Layout(gpus=4, sp=2))
    two = pm.estimate("wan2.1-1.3b", 110_592, pm.Layout(gpus=4, sp=4))
    assert two["activations: blocks' saved inputs"] == one["activations: blocks' saved inputs"] / 2
    const = pm.activation_profile("wan2.1-1.3b").block_saved_const  # the text's K/V: every rank's
    recompute = "activations: one block's recompute"
    assert two[recompute] - const == pytest.approx((one[recompute] - const) / 2)


def test_zero3_shards_parameters_over_all_gpus():
    shape = pm.model_shape("wan2.1-1.3b")
    z2 = pm.estimate("wan2.1-1.3b", 55_296, pm.Layout(gpus=8, zero=2))
    z3 = pm.estimate("wan2.1-1.3b", 55_296, pm.Layout(gpus=8, zero=3))
    assert z2["parameters (bf16)"] == 2 * shape.params
    gathered = 2 * 2 * shape.block_params + 2 * shape.persistent_params
    assert z3["parameters (bf16)"] == pytest.approx(2 * shape.params / 8 + gathered)
    assert z3["fp32 master + Adam m, v"] == pytest.approx(12 * shape.params / 8)
