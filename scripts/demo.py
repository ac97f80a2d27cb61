"""The main job behind `make demo`, end to end on the embedded default.

    python scripts/demo.py [hydra overrides for both training runs, e.g. train.steps=50]

1. writes the demo dataset (camera-motion mp4 clips made from scikit-image photos),
2. caches VAE latents and text embeddings (tiny Wan VAE + tiny UMT5),
3. trains the tiny Wan with VMoBA self-attention (DeepSpeed ZeRO-2; CPU if there is no GPU),
4. trains the full-attention baseline with the same seeds and data,
5. samples a video from the VMoBA checkpoint,
6. writes the VMoBA-vs-baseline comparison report.

Every step is resumable: the dataset step keeps complete clips, the cache skips finished shards (and
compares its inputs by content, so kept clips keep it valid) and training resumes from `latest`, so a
second `make demo` only redoes what is missing. Outputs go under `outputs/demo/`.
"""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "demo"


def steps(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(title, argv) for each stage; `overrides` go to both training runs (after `wandb.group=demo`, which
    puts both runs and the report's run in one wandb group; a later override wins)."""
    vmoba, full = OUT / "vmoba", OUT / "full"
    shared = [f"wandb.group={OUT.name}", *overrides]
    return [
        ("demo dataset", ["scripts/make_demo_dataset.py"]),
        ("latent + text cache", ["scripts/cache_latents.py"]),
        ("train tiny Wan with VMoBA", ["train.py", "attention=vmoba", f"hydra.run.dir={vmoba}", *shared]),
        ("train full-attention baseline", ["train.py", "attention=full", f"hydra.run.dir={full}", *shared]),
        (
            "sample from the VMoBA checkpoint",
            ["sample.py", f"checkpoint={vmoba}", f"output_dir={OUT / 'samples'}"],
        ),
        (
            "compare VMoBA with the baseline",
            [
                "scripts/compare.py",
                "--vmoba",
                str(vmoba),
                "--baseline",
                str(full),
                "--out",
                str(OUT / "report"),
            ],
        ),
    ]


def main(argv: list[str]) -> int:
    plan = steps(argv)
    start = time.monotonic()
    for i, (title, args) in enumerate(plan, 1):
        print(f"\n==> [{i}/{len(plan)}] {title}: python {' '.join(args)}", flush=True)
        t0 = time.monotonic()
        if subprocess.run([sys.executable, *args], cwd=ROOT).returncode != 0:
            print(
                f"\nmake demo failed at step {i} ({title}); the command above reproduces it.", file=sys.stderr
            )
            return 1
        print(f"    done in {time.monotonic() - t0:.0f} s", flush=True)

    samples = sorted((OUT / "samples").rglob("*.mp4"))
    print(f"\nDemo finished in {time.monotonic() - start:.0f} s. Outputs under {OUT.relative_to(ROOT)}/:")
    for name, path in [
        ("dataset", OUT / "dataset"),
        ("latent cache", OUT / "cache"),
        ("VMoBA run (checkpoints/latest, metrics.jsonl, samples/, wandb/)", OUT / "vmoba"),
        ("baseline run", OUT / "full"),
        ("comparison report", OUT / "report" / "report.md"),
    ]:
        print(f"  {name:<66} {path.relative_to(ROOT)}")
    for mp4 in samples:
        print(f"  {'sample video':<66} {mp4.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
