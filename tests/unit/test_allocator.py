"""The `omnimol` program runs under mimalloc with freed pages kept (omnimol_jax/allocator.py), unless told not to."""
import subprocess
import sys

import pytest

from omnimol_jax import allocator

pytestmark = pytest.mark.skipif(allocator.library_path() is None, reason="cmeel-mimalloc ships Linux x86-64 only")


def test_the_environment_preloads_mimalloc_once_and_respects_the_user():
    env = allocator.preload_environment({"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"].split() == [str(allocator.library_path()), "/opt/other.so"]
    assert env["MIMALLOC_PURGE_DELAY"] == "-1" and env["PATH"] == "/bin"
    assert allocator.preload_environment(env) is None  # already preloaded: no second re-exec
    assert allocator.preload_environment({"OMNIMOL_ALLOCATOR": "system"}) is None
    assert allocator.preload_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None
    assert allocator.preload_environment({"MIMALLOC_PURGE_DELAY": "10"})["MIMALLOC_PURGE_DELAY"] == "10"


@pytest.mark.parametrize("switch, expected", [("mimalloc", "mimalloc"), ("system", "glibc")])
def test_the_program_reexecutes_itself_under_mimalloc(switch, expected):
    out = subprocess.run([sys.executable, "-m", "omnimol_jax.cli", "info"], capture_output=True, text=True,
                         env={**allocator.os.environ, "OMNIMOL_ALLOCATOR": switch, "LD_PRELOAD": ""}, check=True)
    assert f"# malloc: {expected} (set OMNIMOL_ALLOCATOR=system for glibc's)" in out.stdout
    exports = subprocess.run([sys.executable, "-m", "omnimol_jax.allocator"], capture_output=True, text=True,
                             env={**allocator.os.environ, "OMNIMOL_ALLOCATOR": switch, "LD_PRELOAD": ""}).stdout
    assert ("export LD_PRELOAD=" in exports) == (switch == "mimalloc")
