"""The omnimol program's XLA:CPU matmul back-end (omnimol_jax/cpu_gemm.py): oneDNN unless the user chose."""
from omnimol_jax import cpu_gemm


def test_onednn_is_added_unless_the_user_chose():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert cpu_gemm.apply(env) == "oneDNN" and cpu_gemm.in_effect(env) == "oneDNN"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_use_onednn=true"
    assert cpu_gemm.apply(env) == "as XLA_FLAGS set it"  # no second flag
    assert env["XLA_FLAGS"].count("onednn") == 1
    for chosen in ("--xla_cpu_use_onednn=false", "--xla_cpu_use_xnnpack=true"):
        env = {"XLA_FLAGS": chosen}
        assert cpu_gemm.apply(env) == "as XLA_FLAGS set it" and env["XLA_FLAGS"] == chosen
    env = {"OMNIMOL_GEMM": "default"}
    assert cpu_gemm.apply(env) == "XLA default" and "XLA_FLAGS" not in env
    empty: dict = {}
    cpu_gemm.apply(empty)
    assert empty["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"
