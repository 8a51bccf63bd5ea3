"""benchmarks/device_suite.sh runs unchanged on CPU with tiny shapes and writes one valid JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the device suite's own run on a GPU machine is its real check
def test_the_device_suite_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": ""}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_suite.sh"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result
    tiny = result["presets"]["tiny"]
    for part in ("forward", "train_step"):
        assert "error" not in tiny[part], tiny[part]
        assert tiny[part]["compile_s"] > 0 and tiny[part]["tokens_per_s"] > 0 and 0 < tiny[part]["mfu"] < 1
    assert tiny["generate"]["new_tokens_per_s"] > 0 and tiny["generate"]["time_to_first_token_s"] > 0
    assert set(tiny["moge_layer"]) == {"stacked", "fused", "naive"}
    assert all(v["temp_bytes"] > 0 for v in tiny["moge_layer"].values())
    kernels = tiny["attention_kernels"]
    assert "error" not in kernels, kernels
    assert {"blockwise", "splash", "flash"} <= set(kernels) and kernels["flash_speedup_vs_blockwise"] > 0
    attention = result["cudnn_attention"]
    assert attention["platform"] == "cpu" and attention["cudnn_fused_attention"] is False
    assert result["skipped"] == [] and result["peak_flops"] > 0
