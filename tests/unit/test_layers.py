"""Code health: the layering (.importlinter) holds and fails on an upward import, the model stays light, ruff
is clean."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([LINT, "--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(REPO / "omnimol_jax", tmp_path / "omnimol_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    lora = tmp_path / "omnimol_jax" / "model" / "lora.py"
    lora.write_text(lora.read_text() + "\nfrom omnimol_jax.train import trainer  # noqa: E402\n")
    result = _lint(tmp_path)
    assert result.returncode == 1
    assert "omnimol_jax.model is not allowed to import omnimol_jax.train" in result.stdout


def test_the_model_imports_neither_grain_nor_rdkit():
    code = ("import sys, omnimol_jax.model.llama, omnimol_jax.model.omnimol; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'grain', 'rdkit', 'selfies', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


def test_ruff_is_clean():
    ruff = str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def test_layout_lists_every_module():
    layout = (REPO / "docs" / "layout.md").read_text()
    missing = []
    for path in sorted((REPO / "omnimol_jax").rglob("*.py")):
        relative = path.relative_to(REPO / "omnimol_jax")
        if path.name in ("__init__.py", "__main__.py") or relative.parts[0] == "cli":
            continue  # packages; cli/ is one line
        if str(relative) not in layout and f" {path.name}" not in layout and f"{path.name}," not in layout:
            missing.append(str(relative))
    assert not missing, f"docs/layout.md misses {missing}"
