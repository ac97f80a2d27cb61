"""Plan the peak GPU memory of training a Wan-class video DiT with VMoBA under DeepSpeed ZeRO-2/3, data
parallel x Ulysses sequence parallel, and say which layouts fit.

    python scripts/plan_memory.py --grid 24x36x64                      # one H200, as bench_train runs it
    python scripts/plan_memory.py --tokens 1000000 --gpus 8 --sp 4 --zero 3
    python scripts/plan_memory.py --fit 1000000 --gpus 8 --gpu-mem 141  # every layout, marking those that fit
    python scripts/plan_memory.py --check                              # against the measured H200 peaks

Nothing is guessed per model: the parameters are counted on the meta device (the arch's own factory or a
diffusers config.json), and the activations one block saves per token are counted by running one real
block of the real width on the CPU (a 1-layer copy of the model, bf16, a 2x4x6 token grid) under
`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage. The Wan block's elementwise chains
are compiled on CUDA (models/wan_block.py), so the CPU run compiles them with the partitioner Inductor
uses (`aot_eager_decomp_partition`): the tensors saved are those the GPU saves. Self-attention runs through
a stand-in kernel that saves nothing; what the real kernels save is added analytically (KERNEL_SAVED).

The peak is the largest of three moments of a step (`estimate`):
- backward: the weights, optimizer states, DeepSpeed's gradient buffers, every block's checkpointed input
  (and kept attention), the tensors saved outside the blocks, plus one block's recompute: what it saves
  for backward and what its attention kernel saves;
- step: the weights, optimizer states, the fp32 gradient partition and torch AdamW's one fp32 temporary
  (foreach sqrt of the second moment);
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GiB = 2**30
DEFAULT_BUCKET = 500_000_000  # training/config.py DeepSpeedConfig.reduce_bucket_size / allgather_bucket_size
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed ZeRO-3 stage3_param_persistence_threshold (default)

# Peak GPU memory measured by scripts/bench_train.py (torch.cuda.max_memory_allocated over the timed steps):
# Wan-2.1-1.3B architecture, one NVIDIA H200, ZeRO-2 with torch AdamW, bf16, activation checkpointing,
# text 512, batch 1. keep = None: no keep_attention; an int: kept in the first that many blocks.
MEASURED = [
    # (video tokens, attention, keep, GiB, date); 55,296 = grid 24x36x64
    (55_296, "block", None, 31.7, "2026-11-29"),
    (55_296, "token", None, 32.0, "2026-11-29"),
    (55_296, "full", None, 31.7, "2026-11-29"),
    (55_296, "block", 30, 53.4, "2026-11-29"),
    (55_296, "token", 30, 57.1, "2026-11-29"),
    (55_296, "full", 30, 49.2, "2026-11-29"),
    (55_296, "block", 15, 43.3, "2026-11-29"),
    (55_296, "token", 15, 45.4, "2026-11-29"),
    (55_296, "full", 15, 41.2, "2026-11-29"),
    (110_592, "block", None, 41.5, "2026-12-04"),
    (221_184, "block", None, 62.9, "2026-12-04"),
    # grids 48x72x128 and 64x72x128; the longest with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    (442_368, "block", None, 106.3, "2026-12-04"),
    (589_824, "block", None, 135.9, "2026-12-04"),
]
MEASURED_DEVICE = "NVIDIA H200 (bench_train.py, wan2.1-1.3b, ZeRO-2, torch AdamW, bf16, checkpointing)"


# ---------------------------------------------------------------------------------------------------------
# The model: parameters on the meta device, config, a 1-layer CPU copy for the activation profile
# ---------------------------------------------------------------------------------------------------------


def load_model(spec: str, device: str | torch.device = "meta", num_layers: int | None = None):
    """The diffusers transformer named by `spec` (a `models.families.ARCHS` name or a diffusers
    config.json path, e.g. a pretrained folder's `transformer/config.json`) built on `device` with random
    weights; `num_layers` overrides the depth (the profile's 1-layer copy)."""
    import diffusers

    from models.families import ARCHS

    if spec in ARCHS:
        with torch.device("meta"):
            meta = ARCHS[spec].build()
        cls, config = type(meta), dict(meta.config)
    elif Path(spec).is_file() or (Path(spec) / "config.json").is_file():
        path = Path(spec) if Path(spec).is_file() else Path(spec) / "config.json"
        config = json.loads(path.read_text())
        cls = getattr(diffusers, config["_class_name"])
    else:
        raise SystemExit(f"--model: {spec!r} is neither one of {sorted(ARCHS)} nor a diffusers config.json")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if num_layers is not None:
        config["num_layers"] = num_layers
    with torch.device(device):
        return cls.from_config(config)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: exact parameter counts and the attention shape."""

    name: str
    params: int  # every parameter
    block_params: int  # one transformer block's
    largest_param: int  # the largest single tensor (ZeRO-3's gather granularity)
    persistent_params: int  # parameters below ZeRO-3's persistence threshold: never partitioned
    num_layers: int
    heads: int
    head_dim: int
    patch: tuple[int, int, int]


@cache
def model_shape(spec: str) -> ModelShape:
    """Parameter counts of `spec` built on the meta device (no memory, exact numel)."""
    from models.families import family_of

    model = load_model(spec)
    params = list(model.parameters())
    blocks = family_of(model).blocks(model)
    cfg = model.config
    return ModelShape(
        name=spec,
        params=sum(p.numel() for p in params),
        block_params=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        largest_param=max(p.numel() for p in params),
        persistent_params=sum(p.numel() for p in params if p.numel() < PERSISTENCE_THRESHOLD),
        num_layers=len(blocks),
        heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim,
        patch=tuple(cfg.patch_size),
    )


# ---------------------------------------------------------------------------------------------------------
# Activations: one real block on the CPU
# ---------------------------------------------------------------------------------------------------------


class StandInAttention(torch.autograd.Function):
    """Self-attention stand-in: allocates the output (and dq, dk, dv in backward) as a kernel does, saves
    nothing; what a real kernel saves is added by `kernel_saved_per_token`."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.zeros_like(q)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad), torch.zeros_like(grad), torch.zeros_like(grad)


def stand_in_kernel(q, k, v, num_text: int = 0):
    return StandInAttention.apply(q, k, v)


@contextlib.contextmanager
def compiled_like_cuda(enabled: bool):
    """Run the Wan block's fused elementwise functions through AOT autograd with Inductor's partitioner
    (`aot_eager_decomp_partition`) on the CPU: on CUDA they are Inductor-compiled (models/wan_block.py), and
    the partitioner decides what they save for backward (fewer, smaller tensors than eager's fp32 chains)."""
    import models.families.wan as wan_family
    import models.wan_block as wan_block

    if not enabled:
        yield
        return

    @cache
    def compiled(fn):
        return torch.compile(fn, backend="aot_eager_decomp_partition", dynamic=False)

    saved = wan_block.fused_on_cuda, wan_family.fused_on_cuda
    wan_block.fused_on_cuda = wan_family.fused_on_cuda = lambda fn, x: compiled(fn)
    try:
        yield
    finally:
        wan_block.fused_on_cuda, wan_family.fused_on_cuda = saved


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes of activations of one model, per video token (`*_tok`) and per step (`*_const`), batch 1.

    Attributes:
        block_input_tok: one block's input, what a checkpointed block saves.
        block_saved_tok, block_saved_const: what one block saves for backward without checkpointing,
            self-attention kernel excluded (text K/V of the cross-attention are in `_const`).
        outside_tok, outside_const: saved outside the blocks (patch embedding, rotary table, condition
            embedder, output head, loss), the block inputs shared by every block (text, modulation) included.
        width, heads: hidden size and attention heads (for the kernels' analytic terms).
    """

    block_input_tok: float
    block_saved_tok: float
    block_saved_const: float
    outside_tok: float
    outside_const: float
    width: int
    heads: int


def _run_one_layer(model, grid, text_len: int, saved: list, seed: int = 0) -> None:
    """Forward + backward of the 1-layer `model` on a random clip of `grid` tokens, bench_train's loss.
    `saved` collects (storage, inside the block) of every tensor saved for backward."""
    from models.families import family_of

    cfg, device = model.config, next(model.parameters()).device
    (pt, ph, pw), (T, H, W) = cfg.patch_size, grid
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, T * pt, H * ph, W * pw, generator=g).bfloat16().to(device)
    text = torch.randn(1, text_len, cfg.text_dim, generator=g).bfloat16().to(device)
    t = torch.rand(1, generator=g).to(device)
    block = family_of(model).blocks(model)[0]
    inside = [False]
    handles = [
        block.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)),
        block.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False)),
    ]

    def pack(t):
        if saved is not None:
            # The storage is held, so ids stay unique while counting.
            saved.append((t.untyped_storage(), inside[0], tuple(t.shape), t.dtype))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _gpu_sdpa():
            pred = model(hidden_states=x, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), (torch.randn_like(x) - x).float())
            loss.backward()
    finally:
        for h in handles:
            h.remove()


class FusedSDPA(torch.autograd.Function):
    """`scaled_dot_product_attention` as the GPU's fused kernels (cuDNN, flash) run it, for the count: saves
    q, k, v, out [B, H, L, D] and the fp32 logsumexp [B, H, L]; no attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _gpu_sdpa():
    """The cross-attention's SDPA as `FusedSDPA`: the CPU and meta devices would take the math path, which
    saves the attention matrix that the GPU's kernels never form."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda query, key, value, *a, **kw: FusedSDPA.apply(
        query, key, value
    )
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def _saved_bytes(records, inside: bool, params: set[int]) -> int:
    """Bytes of the distinct storages saved inside (or outside) the block, parameters (counted as such) not."""
    seen = {
        storage._cdata: storage.nbytes()
        for storage, where, *_ in records
        if where == inside and storage._cdata not in params
    }
    return sum(seen.values())


@cache
def activation_profile(
    spec: str, text_len: int = 512, compiled: bool = True, device: str = "meta"
) -> ActivationProfile:
    """Measure `spec`'s activation bytes on a 1-layer bf16 copy at the real width, at two token grids
    (2x4x6 and 4x4x6) so the per-token and the constant parts separate exactly. On the meta device
    (default) the ops run on shapes alone, so any width costs nothing; `device="cpu"` runs them for real."""
    from models.families import family_of

    model = load_model(spec, device=device, num_layers=1).to(torch.bfloat16).train()
    family = family_of(model)
    if family.prepare is not None:
        family.prepare(model)
    for block in family.blocks(model):
        block.attn1.set_processor(family.processor(stand_in_kernel))
    grids = [(2, 4, 6), (4, 4, 6)]
    tokens = [math.prod(g) for g in grids]
    saved_in, saved_out = [], []
    with torch.random.fork_rng(devices=[]), compiled_like_cuda(compiled):
        for grid in grids:
            records: list = []
            _run_one_layer(model, grid, text_len, records)
            params = {p.untyped_storage()._cdata for p in model.parameters()}
            saved_in.append(_saved_bytes(records, True, params))
            saved_out.append(_saved_bytes(records, False, params))
    span = tokens[1] - tokens[0]

    def split(values):
        slope = (values[1] - values[0]) / span
        return slope, values[0] - slope * tokens[0]

    (s_tok, s_const), (o_tok, o_const) = split(saved_in), split(saved_out)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    return ActivationProfile(
        block_input_tok=width * 2,
        block_saved_tok=s_tok,
        block_saved_const=s_const,
        outside_tok=o_tok,
        outside_const=o_const,
        width=width,
        heads=model.config.num_attention_heads,
    )


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


def kernel_saved_per_token(attention: str, width: int, heads: int) -> float:
    """Bytes the self-attention kernel saves for backward per video token (bf16 [L, H, D] tensors, fp32
    logsumexp [H, L]), added analytically since the profile's stand-in saves nothing:
    full (cuDNN SDPA): q, k, v, out, logsumexp; VMoBA block (flex) and token (keyed, vmoba/keyed.py): q, k,
    v and out in block order, logsumexp, plus the output put back in token order (kept with keep_attention)."""
    tensors = {"full": 4, "block": 5, "token": 5}[attention]
    return tensors * width * 2 + heads * 4


@dataclass(frozen=True)
class Layout:
    gpus: int = 1
    sp: int = 1
    zero: int = 2
    offload: str = "none"  # optimizer states on "cpu" or not
    checkpointing: bool = True
    keep_blocks: int = 0  # blocks keeping their attention output (keep_attention); 0: none
    reduce_bucket: int = DEFAULT_BUCKET
    overlap_comm: bool = True


def estimate(spec: str, tokens: int, layout: Layout, attention: str = "block", text_len: int = 512) -> dict:
    """Peak bytes per GPU and its terms (batch 1, bf16, torch AdamW). Returns {term: bytes} with 'peak'."""
    m, act = model_shape(spec), activation_profile(spec, text_len)
    n, p = layout.gpus, layout.sp
    phi = m.params
    local = math.ceil(tokens / p)  # tokens this rank carries through the blocks (Ulysses)
    terms: dict[str, float] = {}
    if layout.zero == 3:  # bf16 weights sharded; one block gathered plus one prefetched, small ones persist
        terms["parameters (bf16)"] = 2 * phi / n + 2 * (2 * m.block_params) + 2 * m.persistent_params
    else:
        terms["parameters (bf16)"] = 2 * phi
    on_gpu = layout.offload == "none"
    terms["fp32 master + Adam m, v"] = 12 * phi / n if on_gpu else 0
    # DeepSpeed's reduce buckets (two with overlap_comm), bf16, never larger than the model's gradients.
    terms["gradient buckets"] = (2 if layout.overlap_comm else 1) * 2 * min(layout.reduce_bucket, phi)
    kernel = kernel_saved_per_token(attention, act.width, act.heads)
    if layout.checkpointing:
        blocks = m.num_layers * act.block_input_tok * local
        last_kept = layout.keep_blocks >= m.num_layers  # the last block's recompute reuses its kept output
        recompute = (act.block_saved_tok + (0 if last_kept else kernel)) * local + act.block_saved_const
        kept = layout.keep_blocks * kernel * local
    else:
        blocks = m.num_layers * ((act.block_saved_tok + kernel) * local + act.block_saved_const)
        recompute = kept = 0
    terms["activations: blocks' saved inputs" if layout.checkpointing else "activations: blocks"] = blocks
    terms["activations: one block's recompute"] = recompute
    terms["activations: kept attention"] = kept
    terms["activations: outside the blocks"] = act.outside_tok * tokens + act.outside_const
    # Ulysses all-to-all: q, k, v re-laid [L, H/P] and the output back, alive around the kernel.
    terms["sequence-parallel all-to-all"] = 4 * act.width * 2 * local if p > 1 else 0
    backward = sum(terms.values())
    # The optimizer step: weights, states, the fp32 gradient partition and AdamW's fp32 temporary.
    step = terms["parameters (bf16)"] + (12 + 4 + 4) * phi / n if on_gpu else terms["parameters (bf16)"]
    terms["(backward peak)"] = backward
    terms["(optimizer-step peak)"] = step
    terms["peak"] = max(backward, step)
    return terms


def check(spec: str = "wan2.1-1.3b") -> int:
    """Print prediction vs MEASURED; returns the number of rows off by more than 10%."""
    print(f"measured: {MEASURED_DEVICE}")
    print("| tokens | attention | keep_attention | measured GiB | predicted GiB | error | date |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    bad = 0
    for tokens, attention, keep, gib, date in MEASURED:
        pred = estimate(spec, tokens, Layout(keep_blocks=keep or 0), attention)["peak"] / GiB
        err = pred / gib - 1
        bad += abs(err) > 0.10
        print(f"| {tokens:,} | {attention} | {keep or 'off'} | {gib} | {pred:.1f} | {err:+.1%} | {date} |")
    return bad


def fit(spec: str, tokens: int, gpus: int, gpu_mem: float, attention: str, text_len: int) -> None:
    """Every layout of `gpus` GPUs (SP degree dividing heads and GPUs, ZeRO 2/3, checkpointing with and
    without keep_attention, none) with its estimated peak, marking those under `gpu_mem` GiB."""
    m = model_shape(spec)
    print(f"{spec}, {tokens:,} video tokens, {gpus} GPUs of {gpu_mem} GiB, {attention} attention")
    print("| SP | DP | ZeRO | checkpointing | keep_attention | peak GiB/GPU | fits |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for sp in (p for p in range(1, gpus + 1) if gpus % p == 0 and m.heads % p == 0):
        for zero in (2, 3):
            for ckpt, keep in ((True, 0), (True, m.num_layers), (False, 0)):
                layout = Layout(gpus=gpus, sp=sp, zero=zero, checkpointing=ckpt, keep_blocks=keep)
                peak = estimate(spec, tokens, layout, attention, text_len)["peak"] / GiB
                print(
                    f"| {sp} | {gpus // sp} | {zero} | {'on' if ckpt else 'off'} | {'all' if keep else 'off'} "
                    f"| {peak:,.1f} | {'yes' if peak <= gpu_mem else 'no'} |"
                )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="wan2.1-1.3b", help="models.families.ARCHS name or diffusers config.json"
    )
    p.add_argument("--grid", help="token grid TxHxW after patching, e.g. 24x36x64")
    p.add_argument("--tokens", type=int, help="video tokens (instead of --grid)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--attention", default="block", choices=["block", "token", "full"])
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel degree")
    p.add_argument("--zero", type=int, default=2, choices=[2, 3])
    p.add_argument("--offload", default="none", choices=["none", "cpu"], help="optimizer states offload")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--keep-attention", type=int, default=0, metavar="N", help="blocks keeping attention")
    p.add_argument("--fit", type=int, metavar="TOKENS", help="list every layout for TOKENS and which fit")
    p.add_argument("--gpu-mem", type=float, default=141.0, help="GiB per GPU for --fit (H200: 141)")
    p.add_argument(
        "--check", action="store_true", help="prediction vs the measured H200 peaks (exit 1 >10%%)"
    )
    args = p.parse_args(argv)
    if args.check:
        return 1 if check(args.model) else 0
    if args.fit:
        fit(args.model, args.fit, args.gpus, args.gpu_mem, args.attention, args.text_len)
        return 0
    if args.grid:
        tokens = math.prod(int(n) for n in args.grid.lower().split("x"))
    elif args.tokens:
        tokens = args.tokens
    else:
        p.error("give --grid, --tokens, --fit or --check")
    heads = model_shape(args.model).heads
    if args.gpus % args.sp or heads % args.sp:
        p.error(f"--sp {args.sp} must divide --gpus {args.gpus} and the {heads} heads")
    layout = Layout(
        args.gpus, args.sp, args.zero, args.offload, not args.no_checkpointing, args.keep_attention
    )
    terms = estimate(args.model, tokens, layout, args.attention, args.text_len)
    print(
        f"{args.model}, {tokens:,} video tokens + {args.text_len} text, {layout}, {args.attention} attention"
    )
    print("self-attention kernel's saved tensors (q, k, v, out, logsumexp) added analytically")
    for name, value in terms.items():
        print(f"  {name:42s} {value / GiB:8.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
