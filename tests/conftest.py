"""Test setup: 8 fake CPU devices (must be set before jax initialises) and the `slow` marker.

Tests are laid out by kind: unit/ (one module's behaviour), parity/ (against torch / transformers / peft
references), e2e/ (commands and whole runs). Shared reference code lives beside this file (hf_reference.py,
gin_reference_torch.py, data_records.py) and is importable from every kind.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A persistent compilation cache shared by both xdist workers and the subprocesses of e2e tests: many tests
# compile the same tiny train and decode steps (each Trainer builds fresh closures, so jit's in-memory cache
# misses). Programs compiling in under a second are not stored. Results are bitwise those of a fresh compile.
# Subprocesses of the `omnimol` program would add oneDNN to XLA_FLAGS (cpu_gemm.py), and JAX keys its cache by the
# flags: they would miss every program the in-process tests stored. tests/unit/test_cpu_gemm.py checks the choice.
os.environ.setdefault("OMNIMOL_GEMM", "default")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"))

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower checks, run with --run-slow (make test-slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow or `make test-slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory, worker_id):
    """shared_folder(name, build) -> a folder that `build(folder)` fills once per test session, whichever xdist
    worker asks first; the other waits on a file lock and reuses it. For expensive module fixtures (a trained run)
    that tests only read or copy: under `-n 2 --dist load` a module's tests land on both workers, and a plain
    module fixture would be built twice. Paths inside the folder are the same for every worker."""
    import shutil

    from filelock import FileLock

    # each worker's basetemp is <session temp>/popen-gwN: their parent is this session's, shared by the workers
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent

    def get(name, build):
        folder = root / f"shared-{name}"
        with FileLock(str(folder) + ".lock"):
            if not (folder / ".complete").exists():
                shutil.rmtree(folder, ignore_errors=True)  # a build that failed on the other worker
                folder.mkdir(parents=True)
                build(folder)
                (folder / ".complete").touch()
        return folder

    return get
