"""The README's `git clone .../ComfyUI-APT && cd ComfyUI-APT && ./run.sh test` must work: the checkout's
folder name is no Python name, and pytest imports the root `__init__.py` (ComfyUI's entry point) alone."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_suite_collects_in_a_checkout_named_like_the_repository(tmp_path):
    checkout = tmp_path / "ComfyUI-APT"
    ignore = shutil.ignore_patterns("__pycache__", ".venv", "outputs", "runs")
    for name in ("apt_core", "nodes", "training"):
        shutil.copytree(ROOT / name, checkout / name, ignore=ignore)
    for name in ("__init__.py", "pyproject.toml"):
        shutil.copy(ROOT / name, checkout / name)
    (checkout / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", checkout / "tests" / "conftest.py")
    (checkout / "tests" / "test_probe.py").write_text(
        "import apt_core.flow\n\n\ndef test_probe():\n    assert apt_core.flow.shift_time(0.5, 1.0) == 0.5\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_probe.py"],
                          cwd=checkout, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
