"""Multi-process training: 2 JAX processes x 2 CPU devices over localhost (jax.distributed + gloo collectives)
give the same train and validation losses and the same exported model as one process with 4 devices."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from omnimol_jax.cli import main as cli_main

STEPS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "data"
    assert cli_main(["build-data", "--out", str(out), "--size", "24", "--tasks", "weight,forward,molcap",
                     "--workers", "1", "--vocab-size", "600"]) == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def write_config(path: Path, corpus: Path) -> Path:
    config = {
        # no dropout: its masks follow the row order, which differs between the two runs
        "model": {"preset": "tiny", "vocab_size": 1024, "lora": {"enabled": True, "rank": 4, "dropout": 0.0},
                  "moge": {"enabled": True, "layers": "second_half", "num_experts": 2}},
        "graph": {"num_layers": 2, "hidden_size": 32},
        "mesh": {"data": 2, "fsdp": 2},
        # One sample per row: process p of 2 reads stream positions p, p + 2, ..., so every global batch
        # holds the same samples as the single process's (in another row order). Packed rows would differ,
        # since each process packs its own share of the stream.
        "data": {"data_dir": str(corpus), "seq_len": 256, "global_batch_size": 4, "batching": "pad",
                 "num_threads": 1, "prefetch_batches": 0},
        "train": {"max_steps": STEPS, "log_every": 1, "checkpoint_every": 2, "eval_every": 2, "eval_batches": 1,
                  "learning_rate": 3e-3, "export_final": True, "async_checkpointing": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def environment(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **{k: str(v) for k, v in extra.items()})
    return env


def train_command(config: Path, output_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "omnimol_jax.cli", "train", "--no-progress", *flags, "--config", str(config),
            f"train.output_dir={output_dir}"]


def losses(run_dir: Path, kind: str = "train") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind", "train") == kind and "loss" in r]


@pytest.mark.slow  # three training processes compiling cold: ~2 min of the 20-minute CI budget
def test_two_processes_train_like_one(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus)
    single = subprocess.run(train_command(config, tmp_path / "single"), env=environment(4), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    port = free_port()
    # the same file: data.global_batch_size=4 is 2 rows on each of the 2 processes
    procs = [subprocess.Popen(train_command(config, tmp_path / "multi", "--distributed"),
                              env=environment(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                                              JAX_PROCESS_ID=i),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"

    expected, got = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert len(expected) == len(got) == STEPS
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # validation (step 0, 2 and the end) runs on both processes: the eval step is collective
    assert len(losses(tmp_path / "multi", "eval")) == 3
    np.testing.assert_allclose(losses(tmp_path / "multi", "eval"), losses(tmp_path / "single", "eval"), atol=1e-5)
    # checkpoints, the frozen weights and the exported model are written jointly and read back in one process
    steps = sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2", str(STEPS)]
    from omnimol_jax.checkpoint import load_params

    exported_multi, exported_single = (load_params(tmp_path / run / "final") for run in ("multi", "single"))
    assert set(exported_multi) == set(exported_single)
    for key, value in exported_single.items():
        np.testing.assert_allclose(np.asarray(exported_multi[key]), np.asarray(value), atol=1e-5, rtol=0)
    assert (tmp_path / "multi" / "frozen" / "omnimol_checkpoint.json").is_file()
    assert not list((tmp_path / "multi").glob(".*partial*"))


def eval_command(checkpoint: Path, data: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "omnimol_jax.cli", "eval", "--checkpoint", str(checkpoint), "--data", str(data),
            "--tasks", "weight,forward,molcap", "--limit", "5", "--batch-size", "2", "--max-new-tokens", "12",
            "--out", str(out), "--no-progress", *flags]


def run_distributed(command: list[str], processes: int = 2) -> list[str]:
    port = free_port()
    procs = [subprocess.Popen(command, env=environment(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                      JAX_NUM_PROCESSES=processes, JAX_PROCESS_ID=i),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
    return [out for out, _ in outputs]


@pytest.mark.slow  # three evaluation processes compiling cold
def test_two_processes_evaluate_like_one(corpus, tmp_path):
    """`eval --distributed`: each process answers every other batch of the single process's plan on its own
    device; process 0 merges: predictions.jsonl byte for byte and every metric equal one process's; a rerun finds
    everything answered."""
    checkpoint = tmp_path / "model"
    assert cli_main(["init", "--full", "--out", str(checkpoint), "model.preset=tiny", "model.vocab_size=1024",
                     "graph.num_layers=2", "graph.hidden_size=32", "model.initializer_range=0.3"]) == 0
    import shutil

    shutil.copytree(corpus / "tokenizer", checkpoint / "hf_assets", dirs_exist_ok=True)
    single = subprocess.run(eval_command(checkpoint, corpus, tmp_path / "single"), env=environment(1),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    outputs = run_distributed(eval_command(checkpoint, corpus, tmp_path / "multi", "--distributed"))
    assert "process 1 of 2: its predictions went to" in outputs[1]
    one, two = tmp_path / "single", tmp_path / "multi"
    assert (two / "predictions.jsonl").read_bytes() == (one / "predictions.jsonl").read_bytes()
    assert (one / "predictions.jsonl").read_bytes().count(b"\n") == 6  # 2 test records of each task
    assert not list(two.glob("predictions.part-*"))
    for path in sorted((one / "metrics").iterdir()):
        assert (two / "metrics" / path.name).read_text() == path.read_text(), path.name
    # a stopped run's part file counts as answered and is merged by the next run, whatever its process count
    lines = (two / "predictions.jsonl").read_bytes().split(b"\n")[:-1]
    (two / "predictions.jsonl").write_bytes(b"".join(line + b"\n" for line in lines[:4]))
    (two / "predictions.part-1-of-2.jsonl").write_bytes(b"".join(line + b"\n" for line in lines[4:]))
    rerun = subprocess.run(eval_command(checkpoint, corpus, two), env=environment(1), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming: 6 predictions already in" in rerun.stdout + rerun.stderr
    assert (two / "predictions.jsonl").read_bytes() == (one / "predictions.jsonl").read_bytes()
    assert not list(two.glob("predictions.part-*"))
