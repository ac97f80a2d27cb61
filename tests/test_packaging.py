"""The attention library is standalone: importable from anywhere without the framework's deps."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_vmoba_imports_without_framework_packages(tmp_path):
    # Run from an unrelated directory so only the installed `vmoba` (pip install -e .) is importable.
    code = (
        "import sys, vmoba\n"
        "assert hasattr(vmoba, 'vmoba_attention'), 'public API missing'\n"
        "heavy = {'models', 'data', 'training', 'diffusers', 'deepspeed', 'transformers', 'hydra'}\n"
        "loaded = sorted(heavy & {m.split('.')[0] for m in sys.modules})\n"
        "assert not loaded, f'vmoba imported {loaded}'\n"
        "print(vmoba.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(REPO / "vmoba")
