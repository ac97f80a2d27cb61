"""Benchmark whole training steps: VMoBA vs full attention on one DeepSpeed engine, in one process.

Default: the Wan-2.1-1.3B architecture (30 layers, width 1536, random init), bf16, DeepSpeed ZeRO-2 with
torch AdamW, activation checkpointing, one clip of 24x36x64 = 55,296 video tokens (latents
[1, 16, 24, 72, 128]) and 512 random text embeddings [1, 512, 4096]; loss = flow-matching MSE on random
data. Attention processors are parameter-free, so the same engine (weights, optimizer) switches between
VMoBA (one row per config: the positional overrides, then each --variant) and full attention; each gets
`--warmup` untimed steps, then `--steps` timed ones. Prints a markdown table: median step time, video
tokens/s, peak GPU memory, mean VMoBA density, and the speed-up over full attention.

    python scripts/bench_train.py                                # 55,296 tokens (H100-class GPU)
    python scripts/bench_train.py --grid 21x30x52 --attention vmoba_wan2.1_480p   # 32,760 tokens
    python scripts/bench_train.py --variant 'attention.selection=threshold'   # one more VMoBA row
    python scripts/bench_train.py --arch tiny --grid 4x8x8       # CPU smoke run (gloo, fp32)
    python scripts/bench_train.py --lora 64                      # LoRA rank 64 on the frozen model
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():  # DeepSpeed picks its accelerator at import time
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from bench_attention import print_profile  # noqa: E402  (this script's folder is on sys.path)
from hydra import compose, initialize_config_dir  # noqa: E402

from models.attention import install_attention  # noqa: E402
from models.checkpointing import enable_checkpointing  # noqa: E402
from models.config import AttentionConfig, TransformerConfig  # noqa: E402
from models.families import ARCHS  # noqa: E402
from models.lora import apply_lora  # noqa: E402
from models.transformer import build_transformer  # noqa: E402
from models.wan_block import fuse_wan_blocks  # noqa: E402
from schema import validate  # noqa: E402
from training.engine import init_distributed  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch",
        default="wan2.1-1.3b",
        choices=[n for n, a in ARCHS.items() if a.family == "wan"],
        help="random-init Wan architecture (default: wan2.1-1.3b)",
    )
    p.add_argument("--grid", default="24x36x64", help="token grid TxHxW after patching (default: 24x36x64)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (default: 512, Wan's context)")
    p.add_argument(
        "--attention",
        default=None,
        help="configs/attention/<name>.yaml for the VMoBA run (default: vmoba_wan2.1 for "
        "wan2.1-1.3b, vmoba_topk otherwise)",
    )
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the VMoBA config, e.g. attention.topk_3d=54"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help="one more VMoBA run on the same engine: space-separated Hydra overrides applied on top of "
        "the positional ones, e.g. --variant 'attention.selection=threshold' (repeatable)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per attention (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per attention (default: 5)")
    p.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--no-checkpointing", action="store_true", help="disable activation checkpointing")
    only = p.add_mutually_exclusive_group()
    only.add_argument(
        "--no-full",
        action="store_true",
        help="skip the full-attention baseline (long clips, where its step takes minutes)",
    )
    only.add_argument(
        "--full-only", action="store_true", help="only the full-attention baseline (VMoBA measured apart)"
    )
    p.add_argument(
        "--keep-attention",
        nargs="?",
        type=int,
        const=True,
        default=False,
        metavar="N",
        help="the checkpoint's recompute reuses each attention output instead of running attention again, "
        "in every block or in the first N (models.checkpointing.enable_checkpointing(keep_attention=True, "
        "keep_blocks=N))",
    )
    p.add_argument(
        "--diffusers-blocks",
        action="store_true",
        help="diffusers' own Wan blocks, without the fused elementwise chains of models.wan_block",
    )
    p.add_argument(
        "--profile", action="store_true", help="after timing, print the CUDA-time breakdown of one more step"
    )
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="train rank-R LoRA adapters on the frozen model (models.lora, the default targets) instead of "
        "every weight; 0 (default): full fine-tuning",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # --keep-attention alone: every block (True); --keep-attention N: the first N blocks.
    args.keep_blocks = None if isinstance(args.keep_attention, bool) else args.keep_attention
    args.keep_attention = args.keep_attention is not False
    if args.keep_attention and args.no_checkpointing:
        p.error("--keep-attention needs activation checkpointing (drop --no-checkpointing)")
    if args.keep_blocks is not None and args.keep_blocks < 0:
        p.error(f"--keep-attention N needs N >= 0, got {args.keep_blocks}")
    try:
        args.grid = tuple(int(n) for n in args.grid.lower().split("x"))
        assert len(args.grid) == 3 and min(args.grid) > 0
    except (ValueError, AssertionError):
        p.error(f"--grid must be TxHxW positive ints, e.g. 24x36x64; got {args.grid!r}")
    args.attention = args.attention or ("vmoba_wan2.1" if args.arch == "wan2.1-1.3b" else "vmoba_topk")
    return args


def load_attention(name: str, overrides: list[str]) -> AttentionConfig:
    """`configs/attention/<name>.yaml` composed by Hydra (defaults lists included) plus `overrides`."""
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return validate(AttentionConfig, compose(overrides=[f"+attention={name}", *overrides]).attention)


def make_engine(model: torch.nn.Module, bf16: bool):
    """DeepSpeed ZeRO-2 engine around `model` with torch AdamW (no DeepSpeed op build needed)."""
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    params = [p for p in model.parameters() if p.requires_grad]  # the adapters only under --lora
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train_step(engine, batch: dict[str, torch.Tensor], sync) -> float:
    """One flow-matching step (forward, backward, optimizer); returns its wall time in seconds."""
    sync()
    start = time.perf_counter()
    t = batch["t"]  # (B,) in (0, 1)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * batch["x0"] + t.view(-1, 1, 1, 1, 1) * batch["noise"]
    pred = engine(
        hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=batch["text"], return_dict=False
    )[0]
    loss = torch.nn.functional.mse_loss(pred.float(), (batch["noise"] - batch["x0"]).float())
    engine.backward(loss)
    engine.step()
    sync()
    return time.perf_counter() - start


def log(message: str, start: float) -> None:
    """Progress on stderr (the table goes to stdout): setup and compile time are not in the table."""
    print(f"[bench_train {time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> list[dict]:
    start = time.perf_counter()
    args = parse_args(argv)
    runs = (
        []
        if args.full_only
        else [(f"vmoba ({args.attention})", load_attention(args.attention, args.overrides))]
    )
    runs += [
        (f"vmoba ({args.attention}: {v})", load_attention(args.attention, [*args.overrides, *v.split()]))
        for v in ([] if args.full_only else args.variant)
    ]
    if not args.no_full:
        runs.append(("full", AttentionConfig(type="full")))
    _, _, device = init_distributed()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32

    model = build_transformer(TransformerConfig(arch=args.arch, seed=args.seed))
    if args.diffusers_blocks:
        fuse_wan_blocks(model, fused=False)
    if args.lora:
        apply_lora(model, args.lora, seed=args.seed)
    if not args.no_checkpointing:
        enable_checkpointing(model, args.keep_attention, args.keep_blocks)
    engine = make_engine(model, bf16)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = f"LoRA rank {args.lora}" if args.lora else "full fine-tuning"
    log(
        f"built {args.arch} and the ZeRO-2 engine on {device} ({what}: {trained:,} trained parameters)", start
    )

    cfg = model.config
    T, H, W = args.grid
    pt, ph, pw = cfg.patch_size
    g = torch.Generator().manual_seed(args.seed)
    shape = (1, cfg.in_channels, T * pt, H * ph, W * pw)
    batch = {
        "x0": torch.randn(shape, generator=g),
        "noise": torch.randn(shape, generator=g),
        "text": torch.randn(1, args.text_len, cfg.text_dim, generator=g),
        "t": torch.rand(1, generator=g),
    }
    batch = {k: v.to(device=device, dtype=dtype) for k, v in batch.items()}
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = T * H * W

    rows = []
    for name, attn_cfg in runs:
        controller = install_attention(engine.module, attn_cfg)  # same engine, weights and optimizer
        for _ in range(args.warmup):
            train_step(engine, batch, sync)
        log(f"{name}: {args.warmup} warmup steps done (kernel compilation included)", start)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = [train_step(engine, batch, sync) for _ in range(args.steps)]
        if args.profile and cuda:
            print_profile(name, lambda: train_step(engine, batch, sync), iters=1, rows=30)
        density = [v for k, v in controller.stats().items() if k.startswith("density/")]
        rows.append(
            {
                "attention": name,
                "step_s": statistics.median(times),
                "tokens_per_s": tokens / statistics.median(times),
                "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
                "density": float(torch.stack(density).mean()) if density else float("nan"),
            }
        )

    full_s = None if args.no_full else rows[-1]["step_s"]
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    kept = "every block" if args.keep_blocks is None else f"first {args.keep_blocks} blocks"
    print(
        f"\n{args.arch}, grid {T}x{H}x{W} = {tokens:,} video tokens + {args.text_len} text, "
        f"{'bf16' if bf16 else 'fp32'}, ZeRO-2, checkpointing={not args.no_checkpointing}, "
        f"keep_attention={kept if args.keep_attention else 'off'}, "
        f"{'diffusers' if args.diffusers_blocks else 'fused'} Wan blocks, {device_name}, "
        f"median of {args.steps} steps after {args.warmup} warmup\n"
    )
    print("| attention | step (s) | video tokens/s | peak mem (GiB) | mean density | speedup vs full |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speedup = "n/a" if full_s is None else f"{full_s / r['step_s']:.2f}x"
        print(
            f"| {r['attention']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
            f"{r['density']:.3f} | {speedup} |"
        )
    if full_s is not None and not args.full_only:
        print(f"\nfull/VMoBA step-time ratio: {full_s / rows[0]['step_s']:.2f}")
    return rows


if __name__ == "__main__":
    main()
