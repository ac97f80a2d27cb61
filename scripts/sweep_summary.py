"""Write (or rewrite) the summary table of a sweep: `<sweep_dir>/summary.csv` and `summary.md` from each
job's `summary.json` (finished) or `error.json` (failed), one column per swept parameter.
`python train.py -m ...` does this automatically as each job ends.

    python scripts/sweep_summary.py outputs/sweeps/2026-01-01_12-00-00
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.summary import write_sweep_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir with one sub-dir per run")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep_dir: {args.sweep_dir} is not a directory")
    write_sweep_table(args.sweep_dir)
    print((args.sweep_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
