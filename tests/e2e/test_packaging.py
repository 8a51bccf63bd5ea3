"""A non-editable install works: the wheel carries the model presets and the default config."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_installs_into_a_fresh_venv_and_finds_its_presets(tmp_path):
    source = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(REPO / "omnimol_jax", source / "omnimol_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", source / "setup.py")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=600, capture_output=True)
    wheel = next((tmp_path / "dist").glob("omnimol_jax-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    # The dependencies come from this environment's site-packages, appended after the fresh venv's own (a path
    # line, so this environment's editable hook for omnimol_jax is not loaded): only the wheel provides the code.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                    str(wheel)], check=True, timeout=600, capture_output=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the venv provides the code
    where = subprocess.run([str(python), "-c", "import omnimol_jax; print(omnimol_jax.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True, timeout=300, env=env).stdout
    assert where.startswith(str(site)), where
    info = subprocess.run([str(python), "-m", "omnimol_jax.cli", "info", "model.preset=small"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert info.returncode == 0, info.stderr
    assert "preset: small" in info.stdout and "# parameters:" in info.stdout
