"""vmoba kernels on a GPU: FlashAttention's accuracy rule, host syncs (keyed: one per forward), no recompiles, large L."""

import warnings

import pytest
import torch

from vmoba import KernelOptions, VMoBAConfig, vmoba_attention
from vmoba.attention import _layout
from vmoba.backends import resolve
from vmoba.partition import block_layout, partition_layout, unpartition_layout, valid_mask
from vmoba.reference import reference_attention, token_mask
from vmoba.selection import select

pytestmark = pytest.mark.gpu

GRID = (6, 10, 12)  # divides none of the blocks below


def config(kind, granularity, **kw):
    return VMoBAConfig(
        partitions=[kind], block_1d=4, block_2d=[4, 4], block_3d=[4, 4, 8], granularity=granularity, **kw
    )


def low_precision_reference(q, k, v, sel, block_slots, valid):
    """Masked attention computed in q's dtype throughout (FlashAttention's 'same-dtype PyTorch reference')."""
    mask = token_mask(sel, block_slots, valid)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, -torch.inf).softmax(-1), v)


def fwd_bwd(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def block_order(cfg, kind, grid, qkv, pad_to):
    """q, k, v partitioned by layer 0 of `cfg`, with its selection: (qb, kb, vb, sel, block_slots, valid)."""
    layout = _layout(cfg, grid, 0, pad_to)
    valid = valid_mask(layout, qkv[0].device)
    qb, kb, vb = (partition_layout(t, layout) for t in qkv)
    return qb, kb, vb, select(qb, kb, layout, valid, cfg, kind), layout.padded_volume, valid


def check_flash_attention_rule(kernel, qb, kb, vb, sel, S, valid):
    """Kernel error vs fp32 at most 2x (out) / 3x (grads) that of a same-dtype reference, on valid slots."""
    assert not sel.all()
    grad_out = torch.randn_like(qb) * valid[:, None, None]  # padded query slots are dropped downstream
    exact = fwd_bwd(
        lambda *t: reference_attention(*t, sel, S, valid), [t.float() for t in (qb, kb, vb)], grad_out
    )
    same_dtype = fwd_bwd(lambda *t: low_precision_reference(*t, sel, S, valid), (qb, kb, vb), grad_out)
    got_all = fwd_bwd(lambda *t: kernel(*t, sel, S, valid), (qb, kb, vb), grad_out)
    rows = valid[None, :, None, None]
    for name, factor, got, base, ref in zip(
        ("out", "dq", "dk", "dv"), (2, 3, 3, 3), got_all, same_dtype, exact
    ):
        err = ((got.float() - ref) * rows).abs().max().item()
        base_err = ((base.float() - ref) * rows).abs().max().item()
        assert err <= factor * base_err + 1e-5, f"{name}: error {err:.3g} > {factor} x {base_err:.3g}"


@pytest.mark.parametrize(
    "kind, granularity, D, selection",
    [
        ("3d", "block", 128, "topk"),
        ("3d", "token", 128, "threshold"),
        ("2d", "block", 64, "threshold"),
        ("1d", "token", 64, "topk"),
    ],
)
def test_flex_within_flash_attention_rule(kind, granularity, D, selection):
    from vmoba.flex import TILE, flex_block_attention

    torch.manual_seed(0)
    cfg = config(kind, granularity, selection=selection, topk_1d=2, topk_3d=4)
    L = GRID[0] * GRID[1] * GRID[2]
    qkv = [torch.randn(2, L, 2, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    check_flash_attention_rule(flex_block_attention, *block_order(cfg, kind, GRID, qkv, TILE))


FA4_GRID = (16, 8, 16)  # whole 4x4x8 and 4-frame blocks: no padding, no mask in the kernel


def backend_or_skip(name):
    """vmoba.<name> (fa4 | keyed), or a skip saying why it cannot run here."""
    module = getattr(__import__("vmoba." + name), name)
    reason = module.unsupported(torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16))
    if reason:
        pytest.skip(reason)
    return module


def fa4_or_skip():
    return backend_or_skip("fa4")


@pytest.mark.parametrize(
    "kind, granularity, D, selection, grid",
    [
        ("3d", "block", 128, "threshold", FA4_GRID),
        ("1d", "block", 64, "topk", FA4_GRID),
        ("3d", "block", 64, "topk", GRID),  # padded blocks: the valid-key mask on partial tiles
        ("2d", "token", 64, "threshold", GRID),  # the per-token selection mask
    ],
)
@pytest.mark.parametrize("backward_groups", [None, 2])  # saved block order; re-partitioned per 2 heads
def test_fa4_within_flash_attention_rule(kind, granularity, D, selection, grid, backward_groups):
    fa4 = fa4_or_skip()
    torch.manual_seed(5)
    cfg = config(kind, granularity, selection=selection, topk_1d=2, topk_3d=4)
    L = grid[0] * grid[1] * grid[2]
    qkv = [torch.randn(2, L, 3, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    qb, kb, vb, sel, S, valid = block_order(cfg, kind, grid, qkv, fa4.TILE)
    padded = not bool(valid.all())
    assert padded == (grid == GRID)

    def kernel(*args):
        return fa4.fa4_block_attention(*args, padded=padded, backward_head_groups=backward_groups)

    check_flash_attention_rule(kernel, qb, kb, vb, sel, S, valid)


PREFIX = 37  # text tokens in front of the video: a partial first block


def prefix_case(granularity, seed):
    """(config, [q, k, v] bf16 [2, PREFIX + L, 2, 64], grad_out) for a joint-attention call."""
    torch.manual_seed(seed)
    L = GRID[0] * GRID[1] * GRID[2]
    qkv = [torch.randn(2, PREFIX + L, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    return config("3d", granularity, selection="topk", topk_3d=4), qkv, torch.randn_like(qkv[0])


def run_with_prefix(backend, cfg, qkv, grad_out, options=None):
    """[out, dq, dk, dv] of `vmoba_attention` on `backend` with the text prefix."""
    return fwd_bwd(
        lambda *t: vmoba_attention(*t, GRID, cfg, backend=backend, num_prefix=PREFIX, options=options),
        qkv,
        grad_out,
    )


def assert_matches_the_reference_with_prefix(got, cfg, qkv, grad_out):
    want = run_with_prefix("reference", cfg, [t.float() for t in qkv], grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=3e-2, msg=name)


@pytest.mark.parametrize("backward_groups", [None, 2])
def test_fa4_with_a_text_prefix_matches_the_reference_with_gradients(backward_groups):
    fa4_or_skip()
    options = KernelOptions(fa4_backward_head_groups=backward_groups)
    cfg, qkv, grad_out = prefix_case("block", seed=7)
    got = run_with_prefix("fa4", cfg, qkv, grad_out, options)
    assert_matches_the_reference_with_prefix(got, cfg, qkv, grad_out)


def test_auto_takes_keyed_for_tokens_on_cuda():
    keyed_or_skip()
    q = torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve("auto", q, "token").name == "keyed"
    assert resolve("auto", q.float(), "token").name == "flex"  # fp32: neither keyed nor fa4


def test_auto_takes_fa4_for_blocks_on_hopper_and_blackwell():
    fa4_or_skip()
    torch.manual_seed(6)
    L = FA4_GRID[0] * FA4_GRID[1] * FA4_GRID[2]
    q, k, v = (torch.randn(1, L, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = config("3d", "block", selection="topk", topk_3d=4)
    auto, explicit = (vmoba_attention(q, k, v, FA4_GRID, cfg, backend=b) for b in ("auto", "fa4"))
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)


def test_flex_path_has_no_host_sync_and_no_recompile():
    torch.manual_seed(1)
    cfg = config("3d", "block", selection="threshold")
    L = GRID[0] * GRID[1] * GRID[2]

    def step():
        q, k, v = (
            torch.randn(1, L, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        stats = {}
        vmoba_attention(q, k, v, GRID, cfg, backend="flex", stats=stats).sum().backward()
        return stats

    step()  # compile and cache the layout
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            stats = step()  # a new selection: same compiled graph, no sync
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert stats["density"].shape == (2,) and (stats["density"] < 1).all()


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_flex_with_a_text_prefix_matches_the_reference_with_gradients(granularity):
    # Joint attention (num_prefix): the prefix's padded blocks and their full rows go through the kernel.
    torch.manual_seed(4)
    cfg = config("3d", granularity, selection="topk", topk_3d=4)
    L, S = GRID[0] * GRID[1] * GRID[2], 37
    q, k, v = (torch.randn(2, S + L, 2, 64, device="cuda") for _ in range(3))
    grad_out = torch.randn_like(q)
    got, want = (
        fwd_bwd(lambda *t, b=b: vmoba_attention(*t, GRID, cfg, backend=b, num_prefix=S), (q, k, v), grad_out)
        for b in ("flex", "reference")
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=name)


def test_flex_token_granularity_beyond_int32_index_range():
    # 65,536 tokens: q_idx * L would overflow int32; the per-token table indexes [b, h, q, c // 8] only.
    from vmoba.flex import TILE, flex_block_attention

    torch.manual_seed(2)
    grid = (16, 64, 64)
    cfg = config("3d", "token", selection="topk", topk_3d=8)
    L = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, L, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = _layout(cfg, grid, 0, TILE)
    valid = valid_mask(layout, q.device)
    qb, kb, vb = (partition_layout(t, layout) for t in (q, k, v))
    sel = select(qb, kb, layout, valid, cfg, "3d")
    out = flex_block_attention(qb, kb, vb, sel, layout.padded_volume, valid)
    rows = torch.randint(0, L, (64,), device="cuda").sort().values
    rows[-1] = L - 1  # the last query is where an overflow would show
    key_block = torch.arange(L, device="cuda") // layout.padded_volume
    mask = sel[0, 0, rows][:, key_block]  # [64, L]
    scores = (qb[0, rows, 0].float() @ kb[0, :, 0].float().T) * 64**-0.5
    expected = scores.masked_fill(~mask, -torch.inf).softmax(-1) @ vb[0, :, 0].float()
    torch.testing.assert_close(out[0, rows, 0].float(), expected, rtol=2e-2, atol=2e-2)


def test_flash_varlen_within_flash_attention_rule():
    from vmoba.flash import INSTALL_HINT, _flash_varlen_func, flash_varlen_attention

    try:  # flash-attn 2's varlen API; FlashAttention-4 alone provides only the `flash_attn.cute` package
        _flash_varlen_func()
    except ImportError:
        pytest.skip(INSTALL_HINT)

    torch.manual_seed(3)
    cfg = config("3d", "token", selection="threshold")
    L = GRID[0] * GRID[1] * GRID[2]
    qkv = [torch.randn(2, L, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    check_flash_attention_rule(flash_varlen_attention, *block_order(cfg, "3d", GRID, qkv, 1))


@pytest.mark.parametrize(
    "grid, kind, block", [((8, 16, 16), "3d", (4, 4, 8)), ((21, 30, 52), "3d", (3, 10, 4))]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_partition_row_gather_matches_the_strided_copy(grid, kind, block, dtype):
    """The CUDA row gather (exact: a copy) against the CPU permute, both directions, into a head slice too."""
    layout = block_layout(grid, kind, block, pad_to=128)
    x = torch.randn(2, layout.num_tokens, 6, 32, dtype=dtype)
    blocks = partition_layout(x.cuda(), layout)
    assert torch.equal(blocks.cpu(), partition_layout(x, layout))  # zeros at padded slots included
    assert torch.equal(unpartition_layout(blocks, layout).cpu(), x)
    out = torch.full((2, layout.num_tokens, 12, 32), 7.0, dtype=dtype, device="cuda")
    unpartition_layout(blocks[:, :, :4], layout, out=out[:, :, 2:6])
    assert torch.equal(out[:, :, 2:6].cpu(), x[:, :, :4])
    assert bool((out[:, :, :2] == 7).all() and (out[:, :, 6:] == 7).all())  # other heads untouched


def keyed_or_skip():
    return backend_or_skip("keyed")


@pytest.mark.parametrize(
    "kind, granularity, D, selection, grid",
    [
        ("3d", "token", 128, "threshold", GRID),  # padded blocks: invalid keys and never-picked queries
        ("1d", "token", 64, "topk", FA4_GRID),  # 512-slot blocks: four key tiles share one row list
        ("1d", "token", 128, "topk", FA4_GRID),  # the same on sm_90's CUDA kernels (bf16, D = 128)
        ("2d", "token", 64, "topk", GRID),
        ("3d", "block", 64, "threshold", GRID),  # block granularity runs as its per-token rows
    ],
)
def test_keyed_within_flash_attention_rule(kind, granularity, D, selection, grid, monkeypatch):
    keyed = keyed_or_skip()
    from vmoba import _keyed_cuda

    torch.manual_seed(8)
    cfg = config(kind, granularity, selection=selection, topk_1d=2, topk_2d=3, topk_3d=4)
    L = grid[0] * grid[1] * grid[2]
    qkv = [torch.randn(2, L, 3, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    calls = []  # which CUDA kernels ran: on sm_90 with D = 128 both passes must be theirs, elsewhere none

    def counted(name, run):
        def call(*args):
            calls.append(name)
            return run(*args)

        return call

    for name in ("accumulate", "backward"):
        monkeypatch.setattr(_keyed_cuda, name, counted(name, getattr(_keyed_cuda, name)))
    check_flash_attention_rule(keyed.keyed_attention, *block_order(cfg, kind, grid, qkv, keyed.BLOCK_N))
    on_hopper = torch.cuda.get_device_capability() == (9, 0) and D == 128
    assert sorted(set(calls)) == (["accumulate", "backward"] if on_hopper else []), calls


@pytest.mark.parametrize("bound", [45.0, 200.0])
def test_keyed_with_the_norm_bound_or_the_exact_row_max(bound):
    # q, k scaled so that the largest |q| max|k| / sqrt(D) (log2 units) is `bound`: below the limit the
    # forward skips its row-max pass, and rows whose true max lies far under the bound must stay exact;
    # above it the exact row max is computed.
    keyed = keyed_or_skip()
    torch.manual_seed(10)
    cfg = config("3d", "token", selection="topk", topk_3d=4)
    L = GRID[0] * GRID[1] * GRID[2]
    qkv = [torch.randn(2, L, 3, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    qb, kb, vb, sel, S, valid = block_order(cfg, "3d", GRID, qkv, keyed.BLOCK_N)
    scale = (bound / keyed.row_offsets(qb, kb)[0].max()).sqrt()
    qb, kb = (qb * scale).contiguous(), (kb * scale).contiguous()
    offsets, usable = keyed.row_offsets(qb, kb)
    assert bool(usable) == (bound < keyed.BOUND_LIMIT), offsets.max()
    check_flash_attention_rule(keyed.keyed_attention, qb, kb, vb, sel, S, valid)


def test_keyed_with_a_text_prefix_matches_the_reference_with_one_host_sync():
    # The prefix's rows select every block and every row selects its blocks: full row lists.
    keyed_or_skip()
    cfg, qkv, grad_out = prefix_case("token", seed=9)
    run_with_prefix("keyed", cfg, qkv, grad_out)  # compile first
    inputs = [t.detach().requires_grad_() for t in qkv]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = vmoba_attention(*inputs, GRID, cfg, backend="keyed", num_prefix=PREFIX)
        torch.cuda.set_sync_debug_mode("error")  # the backward reuses the lists: no sync at all
        grads = torch.autograd.grad(out, inputs, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs  # sizing the row lists
    assert_matches_the_reference_with_prefix([out, *grads], cfg, qkv, grad_out)


@pytest.mark.parametrize(
    "R, C, V, topk",
    [
        (4096, 432, 128, 108),
        (1536, 24, 64, 7),
        (300, 5, 60, 9),
        (512, 1500, 64, 300),  # 2048 columns: 4 warps share a row
    ],
)
def test_fused_selection_picks_what_the_sort_picks(R, C, V, topk):
    from vmoba import selection

    torch.manual_seed(10)
    scores = torch.randn(2, 3, R, C, device="cuda")
    ties = scores.clone()
    ties[0, 0] = (ties[0, 0] * 2).round() / 2  # many ties, and -0.0 next to 0.0
    ties[1, 2, : R // 3] = 0.25  # whole rows of ties
    row_valid = torch.rand(R, device="cuda") > 0.1
    assert selection._fused_usable(scores)
    args = dict(scope="query", threshold=0.25, topk=topk)
    # Top-k: exactly; the CPU takes the sort.
    fused = selection.select_from_scores(ties, row_valid, V, selection="topk", **args)
    sort = selection.select_from_scores(ties.cpu(), row_valid.cpu(), V, selection="topk", **args)
    assert torch.equal(fused.cpu(), sort)
    # Threshold: up to one block in a row whose cut is within rounding of `need` (rare on continuous scores).
    for tau in (0.25, 0.6):
        args["threshold"] = tau
        fused = selection.select_from_scores(scores, row_valid, V, selection="threshold", **args)
        sort = selection.select_from_scores(scores.cpu(), row_valid.cpu(), V, selection="threshold", **args)
        differ = (fused.cpu() != sort).sum(-1)
        assert differ.max() <= 1 and (differ > 0).sum() <= max(1, differ.numel() // 10_000), differ.sum()


@pytest.mark.parametrize("L, C, H, D", [(4096, 432, 3, 128), (1000, 7, 2, 64)])
def test_tensor_core_token_scores_are_as_accurate_as_fp32(L, C, H, D):
    # A TF32 product would be ~2^13 times less accurate, two bf16 parts of the means ~2^8.
    from vmoba import selection

    q = torch.randn(2, L, H + 1, D, device="cuda", dtype=torch.bfloat16)[:, :, 1:]  # a head slice
    k_mean = torch.randn(2, C, H + 2, D, device="cuda")[:, :, 2:]  # a head slice of the means too
    assert selection._tensor_core_scores_usable(q)
    got = selection._tensor_core_scores(q, k_mean)
    exact = torch.einsum("brhd,bchd->bhrc", q.double(), k_mean.double())
    fp32 = torch.einsum("brhd,bchd->bhrc", q.float(), k_mean)
    err, base = ((x.double() - exact).abs().max().item() for x in (got, fp32))
    assert err <= 8 * base, f"error {err:.3g} > 8 x fp32's {base:.3g}"


def test_selection_stats_of_a_token_selection_match_the_cpu():
    # The CUDA path counts rows per key block with a Triton pass; the CPU one is checked against the oracle.
    from vmoba.attention import selection_stats

    layout = block_layout(GRID, "3d", [4, 4, 8], 1)  # padded blocks: invalid rows must not count
    valid = valid_mask(layout, torch.device("cuda"))
    sel = torch.rand(2, 3, layout.length, layout.num_blocks, device="cuda") < 0.3
    gpu, cpu = selection_stats(sel, layout, valid), selection_stats(sel.cpu(), layout, valid.cpu())
    for key in ("density", "blocks"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key])


def test_keyed_cuda_pass_is_as_accurate_as_the_triton_pass(monkeypatch):
    # The Hopper forward pass (vmoba/_keyed.cu) against Triton's pass 1 and an fp64 reference of
    # what both add: padded blocks (invalid keys), row lists ending anywhere in a tile, two batches, 3 heads.
    keyed = keyed_or_skip()
    from vmoba import _keyed_cuda

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUDA pass is for sm_90 (H100/H200)")
    torch.manual_seed(11)
    cfg = config("3d", "token", selection="topk", topk_3d=5)
    L = GRID[0] * GRID[1] * GRID[2]
    qkv = [torch.randn(2, L, 3, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    qb, kb, vb, sel, S, valid = block_order(cfg, "3d", GRID, qkv, keyed.BLOCK_N)
    assert _keyed_cuda.usable(qb)  # on Hopper it must not fall back silently
    assert not _keyed_cuda.usable(qb, enabled=False)  # KernelOptions(keyed_cuda=False)
    monkeypatch.setenv("VMOBA_KEYED_CUDA", "0")  # the documented override, back to the Triton kernels
    assert not _keyed_cuda.usable(qb)
    monkeypatch.delenv("VMOBA_KEYED_CUDA")
    starts, rows = keyed.row_lists(sel, valid, S)
    # The premise: last tiles (128 rows, a 64-row half per pipeline) that end in either half, so both
    # pipelines' partial and empty tiles run.
    tails = (starts.diff() % 128).tolist()
    assert any(0 < r < 64 for r in tails) and any(r > 64 for r in tails), tails
    offsets, _ = keyed.row_offsets(qb, kb)
    valid8 = valid.view(torch.uint8)
    got = {}
    for name in ("triton", "cuda"):
        acc, row_sum = torch.zeros(qb.shape, device="cuda"), torch.zeros_like(offsets)
        keyed.accumulate(qb, kb, vb, acc, offsets, row_sum, starts, rows, valid8, cuda=name == "cuda")
        got[name] = (acc, row_sum)
    mask = token_mask(sel, S, valid)  # [B, H, L, L]
    s = torch.einsum("blhd,bkhd->bhlk", qb.double(), kb.double()) * 128**-0.5 * 1.4426950408889634
    p = torch.where(mask, torch.exp2(s - offsets.double()[..., None]), 0.0)
    exact = (torch.einsum("bhlk,bkhd->blhd", p, vb.double()), p.sum(-1))
    for i, what in enumerate(("accumulator", "row sums")):
        errs = {n: ((got[n][i].double() - exact[i]).abs().max() / exact[i].abs().max()).item() for n in got}
        assert errs["cuda"] <= 2 * errs["triton"] + 1e-6, (what, errs)
