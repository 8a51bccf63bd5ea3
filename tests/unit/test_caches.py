"""The user cache folder and the persistent compilation cache switch."""
import jax

from omnimol_jax import caches


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("OMNIMOL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert caches.user_cache_dir() == tmp_path / "xdg" / "omnimol-jax"
    monkeypatch.setenv("OMNIMOL_CACHE_DIR", str(tmp_path / "mine"))
    assert caches.user_cache_dir() == tmp_path / "mine"


def test_the_compilation_cache_is_on_by_default_off_on_request_and_a_jax_setting_wins(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("OMNIMOL_CACHE_DIR", str(tmp_path))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(caches.SWITCH, "off")
        assert caches.enable_compilation_cache() is None and not jax.config.jax_compilation_cache_dir
        monkeypatch.delenv(caches.SWITCH)
        assert caches.enable_compilation_cache() == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        monkeypatch.setenv(caches.SWITCH, str(tmp_path / "elsewhere"))  # already set: JAX's own setting wins
        assert caches.enable_compilation_cache() == str(tmp_path / "xla")
        jax.config.update("jax_compilation_cache_dir", None)
        (tmp_path / "file").write_text("")
        monkeypatch.setenv(caches.SWITCH, str(tmp_path / "file" / "sub"))  # cannot be created: compile without
        assert caches.enable_compilation_cache() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_the_compile_watch_counts_compiles_and_their_trace_time_only_while_started():
    import jax
    import numpy as np

    from omnimol_jax.compile_watch import CompileWatch

    double = jax.jit(lambda x: x * 2.0 + 1.0)
    with CompileWatch() as watch:
        double(np.ones(3, np.float32))
        double(np.ones(5, np.float32))  # a new shape: a new program
        double(np.ones(5, np.float32))  # the same: no compile
    assert watch.compiles == 2 and watch.traces == 2 and 0 < watch.compile_s <= watch.wall_s
    double(np.ones(7, np.float32))  # after stop: not counted
    assert watch.compiles == 2 and watch.traces == 2
    assert watch.summary().startswith("2 program(s) compiled; tracing, lowering and compiling took ")
