"""training.metrics, the training loop's metrics. Attention recall: 1 when every block is selected, falling
as blocks are dropped; per-layer collection from a real tiny Wan with VMoBA installed; its per-layer, per-type
summary. Validation loss: exact on an oracle model and deterministic."""

import pytest
import torch

import vmoba
from models.attention import install_attention
from models.config import AttentionConfig, TransformerConfig
from models.transformer import build_transformer
from training import metrics
from training.metrics import attention_recall_per_layer

GRID = (4, 4, 4)  # token grid (T, H, W): 4 frame blocks (1D), 4 tiles (2D), 8 cubes (3D)
BLOCKS = {"1d": 4, "2d": 4, "3d": 8}


def _topk(kind: str, k: int) -> vmoba.VMoBAConfig:
    return vmoba.VMoBAConfig(
        partitions=[kind], block_1d=1, block_2d=(2, 2), block_3d=(2, 2, 2), selection="topk",
        topk_1d=k, topk_2d=k, topk_3d=k, granularity="token",
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_recall_is_one_with_every_block_and_falls_as_blocks_are_dropped(kind):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 64, 2, 16, generator=gen) * 2 for _ in range(2))

    def recall(topk):
        return vmoba.attention_recall(
            q, k, GRID, _topk(kind, topk), num_queries=64, generator=torch.Generator().manual_seed(1)
        )

    n = BLOCKS[kind]
    torch.testing.assert_close(recall(n), torch.ones(2), atol=1e-5, rtol=0)
    values = [recall(topk).mean().item() for topk in range(n, 0, -1)]
    # Top-k sets are nested, so each dropped block removes mass: strictly decreasing.
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.9


def _tiny_wan_forward(model):
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 4, 8, 8, generator=gen)  # patch (1, 2, 2) -> token grid 4x4x4
    text = torch.randn(1, 5, 32, generator=gen)
    return lambda: model(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=text)


@pytest.mark.parametrize("topk", [8, 1])
def test_attention_recall_per_layer_from_a_tiny_wan(topk):
    model = build_transformer(TransformerConfig(arch="tiny")).eval()
    cfg = AttentionConfig(
        type="vmoba", backend="reference", **vars(_topk("1d", topk)) | {"partitions": ["1d", "2d", "3d"]}
    )
    controller = install_attention(model, cfg)
    got = attention_recall_per_layer(controller, _tiny_wan_forward(model), cycle=cfg.partitions)

    assert controller.measure_recall is False  # restored after the measuring forward
    for kind in ("recall", "density"):
        assert {f"{kind}/layer_{i:02d}" for i in range(3)} | {
            f"{kind}/{t}" for t in ("1d", "2d", "3d")
        } <= set(got)
        assert got[f"{kind}/mean"] == pytest.approx(sum(got[f"{kind}/layer_{i:02d}"] for i in range(3)) / 3)
        # One layer per partition type in a 3-layer model: the per-type value is that layer's.
        assert got[f"{kind}/2d"] == got[f"{kind}/layer_01"]
    if topk == 8:  # at least every block of every partition: all of the softmax mass
        assert got["recall/mean"] == pytest.approx(1.0, abs=1e-5)
        assert got["density/mean"] == pytest.approx(1.0, abs=1e-5)
    else:  # own block only: 1/4 (1D, 2D) and 1/8 (3D) of the blocks, and a part of the mass
        assert got["density/1d"] == pytest.approx(0.25, abs=1e-5)
        assert got["density/3d"] == pytest.approx(0.125, abs=1e-5)
        assert all(0 < got[f"recall/layer_{i:02d}"] < 0.95 for i in range(3))


# ----------------------------------------------------------------------------- recall / density summary


def test_summarize_layer_stats_per_layer_type_and_mean():
    stats = {
        "recall/layer_00": torch.tensor([1.0, 0.5]),  # mean over heads 0.75
        "recall/layer_01": torch.tensor([0.6]),
        "recall/layer_03": 0.25,
        "density/layer_00": torch.tensor([0.5, 0.5]),
        "other/thing": torch.tensor(3.0),
    }
    got = metrics.summarize_layer_stats(stats)
    assert got["recall/layer_00"] == pytest.approx(0.75)
    assert got["recall/1d"] == pytest.approx((0.75 + 0.25) / 2)  # layers 0 and 3 are 1D
    assert got["recall/2d"] == pytest.approx(0.6)
    assert "recall/3d" not in got
    assert got["recall/mean"] == pytest.approx((0.75 + 0.6 + 0.25) / 3)
    assert got["density/mean"] == pytest.approx(0.5)
    assert not any(k.startswith("other") for k in got)


# ----------------------------------------------------------------------------- validation loss


def test_validation_loss_is_exact_on_a_known_model_and_deterministic():
    from training.config import ObjectiveConfig
    from training.objective import FlowMatching

    objective = FlowMatching(ObjectiveConfig())
    gen = torch.Generator().manual_seed(8)
    batches = []
    for size, offset in ((1, 1.0), (3, 2.0)):
        latents = torch.randn(size, 4, 3, 4, 4, generator=gen)
        batches.append({"latents": latents, "x0": latents.clone(), "offset": torch.full((size,), offset)})
    seen_t = []

    def oracle(x_t, t, cond):
        # x_t = (1 - t) x0 + t noise, so (x_t - x0) / t is the target velocity noise - x0, exactly.
        seen_t.append(t)
        return (x_t - cond["x0"]) / t.view(-1, 1, 1, 1, 1) + cond["offset"].view(-1, 1, 1, 1, 1)

    got = metrics.validation_loss(oracle, objective, batches, timesteps=(0.3, 0.8))
    assert got == pytest.approx((1 * 1.0 + 3 * 4.0) / 4, rel=1e-5)  # clip-weighted mean of offset^2
    assert sorted({float(t[0]) for t in seen_t}) == pytest.approx([0.3, 0.8])

    def linear(x_t, t, cond):
        return 0.5 * x_t

    first = metrics.validation_loss(linear, objective, batches, seed=3)
    assert metrics.validation_loss(linear, objective, batches, seed=3) == first  # same noise, same value
    assert metrics.validation_loss(linear, objective, batches, seed=4) != pytest.approx(first, rel=1e-6)
    with pytest.raises(ValueError, match="yielded nothing"):
        metrics.validation_loss(linear, objective, [])
    with pytest.raises(KeyError, match="batch 0 has no 'latents'"):
        metrics.validation_loss(linear, objective, [{"x": torch.ones(1)}])
