"""vmoba on CPU: config/argument validation, partition, selection semantics, backends vs a float64 oracle."""

import importlib.util
import itertools

import pytest
import torch

import vmoba
from vmoba import (
    VMoBAConfig,
    attention_recall,
    block_layout,
    partition,
    select_blocks,
    unpartition,
    vmoba_attention,
)
from vmoba.partition import valid_mask
from vmoba.reference import reference_attention

GRID = (5, 4, 5)  # divides none of the blocks below: every layout has padded blocks
BLOCKS = {"1d": 2, "2d": (3, 2), "3d": (2, 3, 2)}


def make_config(kind, **kw):
    blocks = {"block_1d": BLOCKS["1d"], "block_2d": list(BLOCKS["2d"]), "block_3d": list(BLOCKS["3d"])}
    return VMoBAConfig(partitions=[kind], **{**blocks, **kw})


def rand_qkv(B=2, H=2, D=32, grid=GRID, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1] * grid[2]
    return [torch.randn(B, L, H, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def raster_blocks(grid, cube):
    """(block id, slot in a padded-cube layout) of every raster token, from its coordinates."""
    T, H, W = grid
    ct, ch, cw = cube
    nh, nw = -(-H // ch), -(-W // cw)
    t, h, w = (
        x.flatten() for x in torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    )
    block = ((t // ct) * nh + h // ch) * nw + w // cw
    slot = block * (ct * ch * cw) + ((t % ct) * ch + h % ch) * cw + w % cw
    return block, slot


def oracle(q, k, v, grid, config, layer_idx=0):
    """float64 dense attention under the selection's token mask, built from raster coordinates."""
    kind = config.partition_for_layer(layer_idx)
    layout = block_layout(grid, kind, config.block_for(kind))
    block, slot = raster_blocks(grid, layout.cube)
    sel = select_blocks(
        partition(q.detach(), grid, kind, config.block_for(kind)),
        partition(k.detach(), grid, kind, config.block_for(kind)),
        layout.volume,
        selection=config.selection,
        scope=config.scope,
        threshold=config.threshold,
        topk=config.topk_for(kind),
        granularity=config.granularity,
        valid=valid_mask(layout, q.device),
    )
    rows = sel[:, :, slot] if config.granularity == "token" else sel[:, :, block]
    mask = rows[..., block]  # [B, H, L, L]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    out = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, -torch.inf).softmax(-1), v.double())
    return out, mask


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g.to(out.dtype))


# ---------------------------------------------------------------- config and argument validation


def test_config_from_plain_types_and_layer_cycle():
    cfg = VMoBAConfig(**{"partitions": ["3d", "1d"], "block_2d": [2, 2], "block_3d": [1, 2, 2], "topk_3d": 4})
    assert cfg.block_2d == (2, 2) and cfg.block_3d == (1, 2, 2)
    assert [cfg.partition_for_layer(i) for i in range(3)] == ["3d", "1d", "3d"]
    assert cfg.topk_for("3d") == 4
    assert VMoBAConfig(dense_first_layers=2).is_dense(1, None) and not VMoBAConfig().is_dense(0, None)
    assert VMoBAConfig(dense_first_steps=3).is_dense(5, 2) and not VMoBAConfig(dense_first_steps=3).is_dense(
        5, None
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("partitions", ["4d"]),
        ("block_1d", 0),
        ("block_2d", [2]),
        ("block_3d", [1, -1, 2]),
        ("selection", "random"),
        ("threshold", 0.0),
        ("threshold", 1.5),
        ("topk_2d", 0),
        ("scope", "batch"),
        ("granularity", "frame"),
        ("dense_first_steps", -1),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VMoBAConfig(**{field: value})


def test_auto_backend_says_once_when_a_missing_fa4_costs_speed(monkeypatch):
    """On a GPU that could run fa4 but lacks FlashAttention-4, `auto` falls back to flex and warns once,
    naming the install command; other reasons to skip fa4 (e.g. fp32) fall back silently."""
    import dataclasses
    import warnings
    from types import SimpleNamespace

    from vmoba import backends

    def fa4_that(unsupported):  # the registered fa4 record, with another check of what it can run
        monkeypatch.setitem(
            backends.REGISTRY, "fa4", dataclasses.replace(backends.REGISTRY["fa4"], unsupported=unsupported)
        )

    reasons = {"bf16": vmoba.fa4.INSTALL_HINT, "fp32": "fa4 needs fp16 or bf16 q, k, v"}
    fa4_that(lambda q: reasons[q.dtype])
    backends._warn_once.cache_clear()
    gpu = SimpleNamespace(is_cuda=True, dtype="bf16")
    with pytest.warns(UserWarning, match=r"flex because FlashAttention-4 is not installed.*pip install"):
        assert backends.resolve("auto", gpu, "block").name == "flex"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", gpu, "block").name == "flex"  # said once already
        backends._warn_once.cache_clear()
        assert backends.resolve("auto", SimpleNamespace(is_cuda=True, dtype="fp32"), "block").name == "flex"
    fa4_that(lambda q: None)
    assert backends.resolve("auto", gpu, "block").name == "fa4"
    cpu = SimpleNamespace(is_cuda=False, dtype="bf16")
    assert (
        backends.resolve("auto", cpu, "block").name
        == backends.resolve("auto", cpu, "token").name
        == "reference"
    )


def test_attention_rejects_bad_arguments():
    q, k, v = rand_qkv(B=1, H=1, D=8)
    cfg = make_config("3d")
    cases = [
        ((q, k[:, :-1], v, GRID, cfg), {}, "q, k, v"),
        ((q, k.float(), v, GRID, cfg), {}, "dtype"),
        ((q, k, v, (3, 4, 4), cfg), {}, "T\\*H\\*W"),
        ((q, k, v, GRID, make_config("3d", block_3d=[6, 1, 1])), {}, "block"),
        ((q, k, v, GRID, cfg), {"backend": "cuda"}, "backend"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            vmoba_attention(*args, **kw)
    for kw, match in [
        ({"scope": "batch"}, "scope"),
        ({"threshold": 2.0}, "threshold"),
        ({"topk": 0}, "topk"),
    ]:
        with pytest.raises(ValueError, match=match):
            select_blocks(q, k, 4, **kw)


# ---------------------------------------------------------------- partition


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
@pytest.mark.parametrize("pad_to", [1, 16])
def test_partition_places_tokens_by_coordinates_and_inverts(kind, pad_to):
    L = GRID[0] * GRID[1] * GRID[2]
    x = torch.randn(2, L, 3)
    xb = partition(x, GRID, kind, BLOCKS[kind], pad_to=pad_to)
    layout = block_layout(GRID, kind, BLOCKS[kind], pad_to)
    assert xb.shape == (2, layout.length, 3)
    _, slot = raster_blocks(GRID, layout.cube)
    slot = slot // layout.volume * layout.padded_volume + slot % layout.volume
    torch.testing.assert_close(xb[:, slot], x, rtol=0, atol=0)
    valid = valid_mask(layout, x.device)
    assert int(valid.sum()) == L and valid[slot].all()
    assert (xb[:, ~valid] == 0).all()
    torch.testing.assert_close(unpartition(xb, GRID, kind, BLOCKS[kind], pad_to=pad_to), x, rtol=0, atol=0)


def test_1d_partition_of_a_dividing_grid_is_the_identity():
    x = torch.randn(1, 4 * 2 * 3, 2)
    torch.testing.assert_close(partition(x, (4, 2, 3), "1d", 2), x, rtol=0, atol=0)


# ---------------------------------------------------------------- selection semantics


def original_threshold(scores, own, tau):
    """The original VMoBA code's per-(head, query) threshold rule, written as loops:
    scores [R, C] -> bool [R, C]."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for r in range(scores.shape[0]):
        g = scores[r].double()
        span = g.max() - g.min()
        n = (g - g.min()) / (span if span > 1e-6 else 1.0)
        need = max(tau - n[own[r]] / n.sum(), 0.0)
        out[r, own[r]] = True
        covered = 0.0
        for j, c in enumerate(sorted((c for c in range(len(n)) if c != own[r]), key=lambda c: -n[c])):
            if j > 0 and covered >= need:
                break
            out[r, c] = True
            covered += n[c] / n.sum()
    return out


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_query_scope_matches_the_original_rules(granularity):
    B, L, H, D, S = 2, 40, 2, 16, 8
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, L, H, D, generator=g) for _ in range(2))
    kbar = k.double().view(B, L // S, S, H, D).mean(2)
    rows = q.double() if granularity == "token" else q.double().view(B, L // S, S, H, D).mean(2)
    scores = torch.einsum("brhd,bchd->bhrc", rows, kbar)
    own = torch.arange(rows.shape[1]) // (S if granularity == "token" else 1)
    sel = select_blocks(q, k, S, selection="threshold", threshold=0.25, granularity=granularity)
    topk = select_blocks(q, k, S, selection="topk", topk=3, granularity=granularity)
    for b, h in itertools.product(range(B), range(H)):
        assert torch.equal(sel[b, h], original_threshold(scores[b, h], own, 0.25))
        others = scores[b, h].clone()
        others[torch.arange(len(own)), own] = -torch.inf
        expected = torch.zeros_like(topk[b, h]).scatter(-1, others.topk(2, -1).indices, True)
        expected[torch.arange(len(own)), own] = True
        assert torch.equal(topk[b, h], expected)


@pytest.mark.parametrize("scope", ["query", "head", "block", "overall"])
def test_selection_properties(scope):
    B, L, H, D, S = 2, 45, 3, 16, 8  # the last block is shorter
    q, k = (torch.randn(B, L, H, D, generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    C = -(-L // S)
    own = torch.arange(L) // S
    sel = select_blocks(q, k, S, selection="threshold", scope=scope, threshold=0.3)
    assert sel.shape == (B, H, L, C) and sel[:, :, torch.arange(L), own].all()
    if scope == "query":  # own block plus at least one other per query; shared scopes may give none
        assert sel.sum(-1).min() >= 2
    assert (sel.sum((1, 2, 3)) > H * L).all()
    assert torch.equal(sel, select_blocks(q, k, S, selection="threshold", scope=scope, threshold=0.3))
    assert select_blocks(q, k, S, selection="threshold", scope=scope, threshold=1.0).all()
    topk = select_blocks(q, k, S, selection="topk", scope=scope, topk=3)
    per_set = {"query": topk.sum(-1), "head": topk.sum((2, 3)), "overall": topk.sum((1, 2, 3))}
    if scope in per_set:  # own blocks plus exactly (k - 1) per query in the set
        n_rows = {"query": 1, "head": L, "overall": H * L}[scope]
        assert (per_set[scope] == 3 * n_rows).all()
    assert select_blocks(q, k, S, selection="topk", scope=scope, topk=C).all()


@pytest.mark.parametrize("scope, dims", [("query", (-1,)), ("head", (-2, -1))])
def test_threshold_budget_is_met_and_minimal(scope, dims):
    B, L, H, D, S, tau = 1, 48, 2, 16, 6, 0.4
    q, k = (torch.randn(B, L, H, D, generator=torch.Generator().manual_seed(s)) for s in (7, 8))
    sel = select_blocks(q, k, S, selection="threshold", threshold=tau, scope=scope)[0]
    kbar = k.double().view(B, L // S, S, H, D).mean(2)
    g = torch.einsum("brhd,bchd->bhrc", q.double(), kbar)[0]  # [H, L, C]
    lo, hi = g.amin(dims, keepdim=True), g.amax(dims, keepdim=True)
    share = (g - lo) / (hi - lo)
    share = share / share.sum(dims, keepdim=True)
    covered = (share * sel).sum(dims)
    assert (covered >= tau - 1e-6).all()  # own block(s) plus the prefix reach the budget...
    own = torch.zeros_like(sel)
    own[:, torch.arange(L), torch.arange(L) // S] = True
    others = sel & ~own
    smallest = torch.where(others, share, torch.inf).amin(dims)
    several = others.sum(dims) > 1
    assert (covered - smallest)[several].lt(tau + 1e-6).all()  # ...and no shorter prefix would


# ---------------------------------------------------------------- attention vs the float64 oracle

CASES = [
    ("1d", "threshold", "query", "token", 32),
    ("2d", "topk", "query", "block", 64),
    ("3d", "threshold", "head", "token", 128),
    ("3d", "topk", "head", "block", 32),
    ("2d", "threshold", "block", "token", 32),
    ("3d", "threshold", "overall", "block", 64),
]


@pytest.mark.parametrize("kind, selection, scope, granularity, D", CASES)
def test_reference_matches_float64_oracle_forward_and_backward(kind, selection, scope, granularity, D):
    cfg = make_config(kind, selection=selection, scope=scope, granularity=granularity, topk_2d=2, topk_3d=3)
    q, k, v = rand_qkv(D=D)
    expected, mask = oracle(q, k, v, GRID, cfg)
    assert not mask.all()  # genuinely sparse
    out = vmoba_attention(q, k, v, GRID, cfg, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32 = vmoba_attention(q32, k32, v32, GRID, cfg, backend="auto")  # auto = reference on CPU
    torch.testing.assert_close(out32.double(), expected, rtol=1e-4, atol=1e-5)


def test_everything_selected_is_dense_attention():
    q, k, v = rand_qkv()
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v))
    ).transpose(1, 2)
    for cfg in (make_config("3d", threshold=1.0), make_config("2d", selection="topk", topk_2d=99)):
        torch.testing.assert_close(vmoba_attention(q, k, v, GRID, cfg), dense, rtol=1e-10, atol=1e-10)


def test_dense_first_layers_and_steps():
    q, k, v = rand_qkv()
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v))
    ).transpose(1, 2)
    cfg = make_config("3d", dense_first_layers=1, dense_first_steps=2)
    stats = {}
    torch.testing.assert_close(vmoba_attention(q, k, v, GRID, cfg, layer_idx=0, stats=stats), dense)
    assert torch.equal(stats["density"], torch.ones(2))
    torch.testing.assert_close(vmoba_attention(q, k, v, GRID, cfg, layer_idx=1, step=1), dense)
    assert not torch.allclose(vmoba_attention(q, k, v, GRID, cfg, layer_idx=1, step=2), dense)
    assert not torch.allclose(vmoba_attention(q, k, v, GRID, cfg, layer_idx=1), dense)


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # the gate a head at a time
@pytest.mark.parametrize("granularity", ["token", "block"])
def test_stats_and_recall_match_the_oracle_mask(granularity, chunk_bytes):
    options = vmoba.KernelOptions(gate_chunk_bytes=chunk_bytes) if chunk_bytes else None
    cfg = make_config("3d", granularity=granularity)
    q, k, v = rand_qkv(H=3)
    _, mask = oracle(q, k, v, GRID, cfg)
    stats = {}
    vmoba_attention(q, k, v, GRID, cfg, stats=stats, options=options)
    torch.testing.assert_close(stats["density"], mask.double().mean((0, 2, 3)).float())
    assert stats["density"].shape == stats["blocks"].shape == (3,)
    probs = (torch.einsum("bqhd,bkhd->bhqk", q, k).detach() / q.shape[-1] ** 0.5).softmax(-1)
    expected = (probs * mask).sum(-1).mean((0, 2)).float()
    torch.testing.assert_close(
        attention_recall(q, k, GRID, cfg, num_queries=10_000, options=options), expected
    )
    sampled = attention_recall(q, k, GRID, cfg, num_queries=20, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (3,) and ((sampled > 0) & (sampled <= 1 + 1e-6)).all()
    assert torch.allclose(attention_recall(q, k, GRID, make_config("3d", threshold=1.0)), torch.ones(3))


@pytest.mark.parametrize(
    "kind, granularity, backend",
    [("3d", "token", "reference"), ("1d", "block", "reference"), ("2d", "block", "flex")],
)
def test_prefix_tokens_attend_everywhere_and_are_attended_by_every_query(kind, granularity, backend):
    # Joint attention (e.g. CogVideoX's text): S prefix tokens are global; the video part keeps VMoBA's
    # selection, made from the video tokens alone. Oracle: the float64 dense softmax under that mask.
    cfg = make_config(kind, granularity=granularity, selection="topk", topk_1d=2, topk_2d=2, topk_3d=3)
    S = 7  # not a multiple of any block size: the prefix blocks are padded
    q, k, v = (torch.cat([p, t], dim=1) for p, t in zip(rand_qkv(grid=(1, 1, S), seed=3), rand_qkv()))
    _, video_mask = oracle(q[:, S:], k[:, S:], v[:, S:], GRID, cfg)
    mask = torch.nn.functional.pad(video_mask, (S, 0, S, 0), value=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, -torch.inf).softmax(-1), v)
    if backend == "flex":  # FlexAttention has no CPU backward: forward only, in fp32
        out = vmoba_attention(
            *(t.detach().float() for t in (q, k, v)), GRID, cfg, backend="flex", num_prefix=S
        )
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
        return
    stats = {}
    out = vmoba_attention(q, k, v, GRID, cfg, backend=backend, stats=stats, num_prefix=S)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.allclose(stats["density"], video_mask.double().mean((0, 2, 3)).float())
    with pytest.raises(ValueError, match="num_prefix"):
        vmoba_attention(q, k, v, GRID, cfg, num_prefix=q.shape[1])


# ---------------------------------------------------------------- flex (CPU: forward only) and flash_varlen


@pytest.mark.parametrize("kind, granularity", [("3d", "token"), ("2d", "block")])
def test_flex_forward_matches_oracle_on_cpu(kind, granularity):
    # FlexAttention has no CPU backward; gradients are checked on the GPU (test_vmoba_gpu.py). The second
    # call has a new selection: it must reuse the compiled kernel and still follow the new mask (the mask's
    # tensors are graph inputs, not constants baked in at compile time).
    cfg = make_config(kind, granularity=granularity, selection="topk", topk_2d=2, topk_3d=3)
    for stance in ("default", "fail_on_recompile"):
        q, k, v = (t.detach().float() for t in rand_qkv(D=32))
        expected, _ = oracle(q, k, v, GRID, cfg)
        with torch.compiler.set_stance(stance):
            out = vmoba_attention(q, k, v, GRID, cfg, backend="flex")
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_tile_tables_list_selected_tiles_first_in_order():
    # The BlockMask tables come from a sort-free stable partition; the kernel reads the first `count`
    # indices of each row, and must be able to read the rest (a permutation of all tiles) safely.
    from vmoba.tiles import _ordered

    tiles = torch.rand(2, 3, 5, 11) < torch.rand(2, 3, 5, 1)  # rows from empty to full
    counts, indices = _ordered(tiles)
    assert counts.dtype == indices.dtype == torch.int32
    assert torch.equal(counts, tiles.sum(-1, dtype=torch.int32))
    assert torch.equal(indices.sort(-1).values, torch.arange(11, dtype=torch.int32).expand_as(indices))
    for row, count, order in zip(tiles.view(-1, 11), counts.view(-1), indices.view(-1, 11)):
        assert order[:count].tolist() == row.nonzero().flatten().tolist()


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, return_attn_probs=False):
    """flash_attn_varlen_func's contract in plain torch (lse not differentiated, like flash-attn)."""
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[s] : cu_q[s + 1], 0], k[cu_k[s] : cu_k[s + 1], 0], v[cu_k[s] : cu_k[s + 1], 0]
        logits = qs @ ks.T * softmax_scale
        outs.append(logits.softmax(-1) @ vs)
        lses.append(logits.logsumexp(-1).detach())
    out = torch.cat(outs)[:, None]
    return (out, torch.cat(lses)[None], None) if return_attn_probs else out


def test_flash_varlen_merge_and_lse_gradients(monkeypatch):
    # The merge of per-block partial outputs and the lse gradient are this backend's own math: check them
    # with a torch implementation of flash-attn's public varlen contract (the real kernel: GPU tests).
    import vmoba.flash

    monkeypatch.setattr(vmoba.flash, "_flash_varlen_func", lambda: torch_varlen)
    monkeypatch.setattr(vmoba.flash, "_LOW_PRECISION", (torch.float64,))
    for cfg in (make_config("3d", granularity="token"), make_config("2d", granularity="block", scope="head")):
        q, k, v = rand_qkv(D=16)
        expected, _ = oracle(q, k, v, GRID, cfg)
        out = vmoba_attention(q, k, v, GRID, cfg, backend="flash_varlen")
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v))):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        # With a text prefix (joint attention): the reference backend is checked against the oracle above.
        q, k, v = (
            torch.cat([p, t], dim=1) for p, t in zip(rand_qkv(D=16, grid=(1, 1, 5), seed=4), (q, k, v))
        )
        out, want = (
            vmoba_attention(q, k, v, GRID, cfg, backend=b, num_prefix=5)
            for b in ("flash_varlen", "reference")
        )
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_varlen_without_flash_attn_says_how_to_install():
    q, k, v = (t.detach().bfloat16() for t in rand_qkv(D=16))
    with pytest.raises(ImportError, match="pip install flash-attn --no-build-isolation"):
        vmoba_attention(q, k, v, GRID, make_config("3d"), backend="flash_varlen")


@pytest.mark.parametrize("grid", [(4, 8, 8), (3, 6, 10)])  # whole cubes; padded cubes
@pytest.mark.parametrize("num_prefix", [0, 5])
def test_block_order_writes_into_a_head_slice(grid, num_prefix):
    # fa4's backward writes each head group's gradients straight into slices of the raster gradient.
    from vmoba.partition import BlockOrder, block_layout

    order = BlockOrder(block_layout(grid, "3d", (2, 4, 4), 16), num_prefix)
    assert order.padded == (grid != (4, 8, 8) or num_prefix > 0)  # 5 prefix tokens pad one 32-slot block
    x = torch.randn(2, num_prefix + grid[0] * grid[1] * grid[2], 6, 8, dtype=torch.float64)
    blocks = order.to_blocks(x)
    out = torch.full_like(x, torch.nan)
    for heads in (slice(0, 4), slice(4, 6)):
        order.from_blocks(blocks[:, :, heads], out=out[:, :, heads])
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    torch.testing.assert_close(order.from_blocks(blocks), x, rtol=0, atol=0)


class _TorchKernel:
    """fa4's `_Kernel` interface computed by the reference backend (FA4 itself needs a Hopper GPU): lets the
    CPU check `_BlockSparse`'s raster <-> block plumbing, what it saves and its head-group backward."""

    def __init__(self, sel, block_slots, valid):
        self.sel, self.block_slots, self.valid, self.calls = sel, block_slots, valid, []

    def forward(self, q, k, v):
        out = reference_attention(q, k, v, self.sel, self.block_slots, self.valid)
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)

    def backward(self, q, k, v, out, grad_out, lse, heads):
        self.calls.append((heads, q.shape[2]))
        assert all(t.is_contiguous() for t in (q, k, v, out, grad_out))
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_() for t in (q, k, v)]
            o = reference_attention(*qkv, self.sel[:, heads], self.block_slots, self.valid)
            return torch.autograd.grad(o, qkv, grad_out)


@pytest.mark.parametrize(
    "groups, expected_calls", [(None, [(slice(None), 3)]), (2, [(slice(0, 2), 2), (slice(2, 4), 1)])]
)
def test_fa4_autograd_function_matches_the_reference_in_both_backward_modes(groups, expected_calls):
    from vmoba import fa4
    from vmoba.attention import _joint_selection, _layout
    from vmoba.partition import BlockOrder
    from vmoba.selection import select

    S, cfg = 3, make_config("3d", granularity="block", selection="topk", topk_3d=2)
    layout = _layout(cfg, GRID, 0, 16)
    order = BlockOrder(layout, S)
    q, k, v = rand_qkv(B=2, H=3, D=8)
    q, k, v = (torch.cat([t[:, :S] * 0.5, t], 1).detach().requires_grad_() for t in (q, k, v))  # a prefix
    valid = valid_mask(layout, q.device)
    blocks = [order.to_blocks(t.detach()) for t in (q, k, v)]
    sel = select(blocks[0][:, order.head :], blocks[1][:, order.head :], layout, valid, cfg, "3d")
    sel, valid = _joint_selection(sel, valid, order)
    assert not sel.all()
    kernel = _TorchKernel(sel, layout.padded_volume, valid)
    grad_out = torch.randn_like(q)
    got = fa4._BlockSparse.apply(q, k, v, kernel, order, None, groups)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    assert kernel.calls == expected_calls
    want = order.from_blocks(
        reference_attention(*(order.to_blocks(t) for t in (q, k, v)), sel, layout.padded_volume, valid)
    )
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fa4_refuses_what_it_cannot_run_and_says_why():
    from vmoba import fa4

    q = torch.randn(1, 256, 2, 64, dtype=torch.bfloat16)
    assert "fp16 or bf16" in fa4.unsupported(q.float())
    assert "head dim" in fa4.unsupported(q[..., :40])
    assert "Hopper" in fa4.unsupported(q)  # CPU
    cfg = make_config("1d", block_1d=1, granularity="block")
    with pytest.raises(ValueError, match="Hopper"):
        vmoba_attention(q, q, q, (2, 8, 16), cfg, backend="fa4")


def test_public_api_names():
    assert {
        "VMoBAConfig",
        "vmoba_attention",
        "attention_recall",
        "partition",
        "unpartition",
        "select_blocks",
    } <= set(vmoba.__all__)


def test_gate_and_reference_stay_fp32_under_autocast():
    cfg = make_config("3d", granularity="token")
    q, k, v = (t.detach().float() for t in rand_qkv())
    plain = vmoba_attention(q, k, v, GRID, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = vmoba_attention(q, k, v, GRID, cfg)
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


def test_rows_view_takes_token_rows_and_refuses_split_rows():
    from vmoba.gather import rows_view

    x = torch.randn(2, 5, 4, 3)
    heads = x[:, :, 1:3]  # a head slice: rows of 2*3 contiguous values, token stride 12
    rows = rows_view(heads)
    assert rows.shape == (2, 5, 6) and rows.stride() == (60, 12, 1)
    assert torch.equal(rows, heads.reshape(2, 5, 6))
    assert rows_view(x[..., :2]) is None  # a row split inside the last dim is not one contiguous run
    assert rows_view(x.transpose(2, 3)) is None


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_slot_indices_are_the_partition_and_its_inverse(kind):
    # The row gather's indices: partitioning by them equals the strided partition, and they invert each other.
    from vmoba.partition import block_layout, partition_layout, slot_sources, token_slots

    layout = block_layout(GRID, kind, BLOCKS[kind], pad_to=8)  # padded grid and padded blocks
    sources, slots = slot_sources(layout, torch.device("cpu")), token_slots(layout, torch.device("cpu"))
    x = torch.randn(2, layout.num_tokens, 3)
    gathered = torch.where((sources >= 0)[None, :, None], x[:, sources.clamp(min=0).long()], 0)
    assert torch.equal(gathered, partition_layout(x, layout))
    assert torch.equal(sources[slots.long()], torch.arange(layout.num_tokens, dtype=torch.int32))
    assert torch.equal(valid_mask(layout, torch.device("cpu")), sources >= 0)
    assert int((sources >= 0).sum()) == layout.num_tokens < layout.length


@pytest.mark.parametrize("scope", ["query", "head", "overall"])
@pytest.mark.parametrize("granularity", ["token", "block"])
def test_gate_taken_a_few_heads_at_a_time_selects_the_same(scope, granularity, monkeypatch):
    # Scopes that never mix heads compute the fp32 scores in head chunks (bounded memory); the picks
    # must not depend on the chunking, and `overall` (which mixes heads) must not be chunked.
    from vmoba import selection
    from vmoba.attention import _layout
    from vmoba.partition import partition_layout
    from vmoba.selection import select

    q, k, _ = (t.detach() for t in rand_qkv(H=5, seed=int(torch.randint(0, 2**31, ()))))
    cfg = make_config("3d", granularity=granularity, scope=scope, selection="topk", topk_3d=2)
    layout = _layout(cfg, GRID, 0, 1)
    valid = valid_mask(layout, q.device)
    qb, kb = (partition_layout(t, layout) for t in (q, k))
    whole = select(qb, kb, layout, valid, cfg, "3d")
    heads_scored = []  # the heads of each gate_scores call

    def gate_scores(q, *args):
        heads_scored.append(q.shape[2])
        return scores(q, *args)

    scores = selection.gate_scores
    monkeypatch.setattr(selection, "gate_scores", gate_scores)
    assert torch.equal(select(qb, kb, layout, valid, cfg, "3d", chunk_bytes=1), whole)
    assert heads_scored == ([5] if scope == "overall" else [1] * 5)  # one head at a time where allowed
    assert whole[:, :, valid if granularity == "token" else slice(None)].any(-1).all()


@pytest.mark.parametrize("granularity, num_prefix", [("token", 0), ("block", 5)])
def test_a_registered_backend_runs_through_vmoba_attention(granularity, num_prefix):
    """docs/vmoba.md, "How to add an attention backend": a toy record calling the reference kernel runs
    forward and backward through `vmoba_attention(backend="toy")` as the built-in reference does, with
    its own tile padding and its own check of what it can run; unregistered, its name is refused again."""
    from vmoba.backends import Backend, register, unregister

    block_slots = []

    def toy(q, k, v, sel, valid, order, *, blocks, options):
        block_slots.append(order.layout.padded_volume)
        return order.from_blocks(reference_attention(*blocks, sel, order.layout.padded_volume, valid))

    def unsupported(q):
        return None if q.dtype == torch.float64 else "toy runs fp64 only"

    cfg = make_config("3d", granularity=granularity)
    seed = int(torch.randint(0, 2**31, ()))
    q, k, v = rand_qkv(seed=seed)
    if num_prefix:  # text tokens in front of the video (joint attention)
        prefix = rand_qkv(grid=(1, 1, num_prefix), seed=seed + 1)
        q, k, v = (torch.cat([p, t], 1).detach().requires_grad_() for p, t in zip(prefix, (q, k, v)))
    want = vmoba_attention(q, k, v, GRID, cfg, backend="reference", num_prefix=num_prefix)
    register(Backend("toy", toy, pad_to=8, unsupported=unsupported))
    try:
        assert "toy" in vmoba.BACKENDS
        with pytest.raises(ValueError, match="registered already"):
            register(Backend("toy", toy))
        got = vmoba_attention(q, k, v, GRID, cfg, backend="toy", num_prefix=num_prefix)
        with pytest.raises(ValueError, match="toy runs fp64 only"):
            vmoba_attention(*(t.float() for t in (q, k, v)), GRID, cfg, backend="toy", num_prefix=num_prefix)
    finally:
        unregister("toy")
    assert block_slots == [16]  # 2x3x2 = 12-slot blocks, padded to a multiple of 8
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(got, (q, k, v)), grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert "toy" not in vmoba.BACKENDS
    with pytest.raises(ValueError, match="backend must be one of"):
        vmoba_attention(q, k, v, GRID, cfg, backend="toy", num_prefix=num_prefix)


def test_keyed_backend_says_why_it_cannot_run():
    from vmoba import keyed

    q, k, v = (t.detach() for t in rand_qkv(dtype=torch.bfloat16))
    assert "fp16 or bf16" in keyed.unsupported(q.float())
    assert "head dim" in keyed.unsupported(torch.empty(1, 4, 2, 256, dtype=torch.bfloat16))
    assert "CUDA" in keyed.unsupported(q)
    with pytest.raises(ValueError, match="keyed runs on CUDA"):
        vmoba_attention(q, k, v, GRID, make_config("3d", granularity="token"), backend="keyed")


def test_keyed_cuda_source_compiles_for_hopper_with_nvrtc():
    # The Hopper kernels (forward pass 1, backward) ship as CUDA source that NVRTC (in PyTorch's CUDA wheels)
    # compiles at first use; compiling needs no GPU, so a broken source fails here rather than on an H100.
    from vmoba import _keyed_cuda

    try:
        from torch.cuda._utils import _get_gpu_rtc_library, _nvrtc_compile

        _get_gpu_rtc_library()
    except (ImportError, OSError, RuntimeError) as e:
        pytest.skip(f"no NVRTC in this PyTorch: {e}")
    source = _keyed_cuda.SOURCE.read_text()
    for kernel in _keyed_cuda.SMEM:
        cubin, name = _nvrtc_compile(source, kernel, "90a", nvcc_options=_keyed_cuda.OPTIONS)
        assert name == kernel  # extern "C": the name the loader asks for
        assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000
    assert not _keyed_cuda.usable(torch.empty(1, 128, 2, 128, dtype=torch.bfloat16))  # CPU tensors: Triton's
