"""Ulysses sequence parallelism on CPU: 2 real gloo processes against one, fp32.

The output and every parameter gradient of a 2-rank sequence-parallel forward + backward of tiny Wan
(gradients summed over the ranks, as DeepSpeed does over the SP group) equal the one-rank ones, for every
partition (1D, 2D, 3D: the tiny model's three layers), token and block granularity, full attention, and a
token grid (3x3x3 = 27 tokens) that does not divide by the 2 ranks.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.attention import install_attention
from models.config import AttentionConfig, TransformerConfig
from models.transformer import build_transformer

WORLD = 2
LATENT = (1, 4, 3, 6, 6)  # [B, C, F, H, W] -> a 3x3x3 token grid with Wan's (1, 2, 2) patches
VARIANTS = {
    "vmoba-block": dict(granularity="block"),
    "vmoba-token": dict(granularity="token"),
    "vmoba-topk": dict(selection="topk", topk_1d=2, topk_2d=2, topk_3d=2),
    "full": dict(type="full"),
}
BLOCKS = dict(block_1d=1, block_2d=[2, 2], block_3d=[1, 2, 2], threshold=0.3, backend="reference")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward_backward(model, latents, timestep, text, target):
    out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    loss = ((out - target) ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {name: _compare(rank, variant) for name, variant in VARIANTS.items()}
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _compare(rank: int, variant: dict) -> dict:
    """One variant on this rank: the SP run against the one-rank reference (reported by rank 0)."""
    from models.sequence_parallel import enable_sequence_parallel

    g = torch.Generator().manual_seed(7)  # the same inputs on every rank, fresh per variant
    latents = torch.randn(*LATENT, generator=g)
    timestep = torch.rand(1, generator=g) * 1000
    text = torch.randn(1, 5, 32, generator=g)
    target = torch.randn(*LATENT, generator=g)
    cfg = AttentionConfig(**{**BLOCKS, **variant})

    reference = build_transformer(TransformerConfig(arch="tiny", seed=3))
    install_attention(reference, cfg)
    ref_out, ref_grads = _forward_backward(reference, latents, timestep, text, target)

    model = build_transformer(TransformerConfig(arch="tiny", seed=3))
    controller = install_attention(model, cfg)
    enable_sequence_parallel(model, controller, dist.group.WORLD)
    out, grads = _forward_backward(model, latents, timestep, text, target)
    for grad in grads.values():
        dist.all_reduce(grad)  # DeepSpeed sums the SP group's gradients
    density = controller.stats().get("density/layer_01", torch.ones(()))
    dist.all_reduce(density)
    return {
        "out": (out - ref_out).abs().max().item(),
        "scale": ref_out.abs().max().item(),
        "grad": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "missing": sorted(set(ref_grads) ^ set(grads)),
        "density": (density / WORLD).item(),
        "ref_density": reference._attention_controller.stats().get("density/layer_01", torch.ones(())).item(),
    }


@pytest.fixture(scope="module")
def results() -> dict:
    """Every variant, run in one pair of processes (each start imports DeepSpeed: ~15 s)."""
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_worker, args=(_free_port(), queue), nprocs=WORLD, start_method="spawn")
    return queue.get(timeout=60)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_rank_sequence_parallel_equals_one_rank(results, name):
    r = results[name]
    assert not r["missing"], r["missing"]
    assert r["out"] <= 1e-5 * r["scale"], r
    assert r["grad"] <= 1e-5 * r["grad_scale"], r
    assert abs(r["density"] - r["ref_density"]) < 1e-6, r  # the SP group's mean over its heads
    if name != "full":
        assert r["ref_density"] < 1, r  # VMoBA selected (the check above would pass trivially at 1)
