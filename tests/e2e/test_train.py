"""Training: exact resume (also after SIGTERM), sharded == single device, corrupt checkpoints, typos, NaN skip."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from omnimol_jax.cli import main as cli_main
from omnimol_jax.compile_watch import CompileWatch
from omnimol_jax.config import ConfigError, load_config
from omnimol_jax.train.trainer import Trainer

TASKS = "weight,logp,forward,molcap,iupac"


@pytest.fixture(scope="module")
def corpus(shared_folder):
    def build(folder):
        assert cli_main(["build-data", "--out", str(folder / "data"), "--size", "40", "--tasks", TASKS, "--workers",
                         "1", "--vocab-size", "600"]) == 0

    return shared_folder("train-corpus", build) / "data"


def write_config(path: Path, corpus: Path, output_dir: Path, **train) -> Path:
    config = {
        "model": {"preset": "tiny", "vocab_size": 1024, "lora": {"enabled": True, "rank": 4, "dropout": 0.1},
                  "moge": {"enabled": True, "layers": "second_half", "num_experts": 4}},
        "graph": {"num_layers": 2, "hidden_size": 32},
        "mesh": {"data": -1},
        "data": {"data_dir": str(corpus), "seq_len": 384, "global_batch_size": 8, "max_samples_per_row": 4,
                 "num_threads": 1, "prefetch_batches": 0},
        "train": {"output_dir": str(output_dir), "max_steps": 6, "log_every": 1, "checkpoint_every": 100,
                  "eval_batches": 1, "learning_rate": 3e-3, "warmup_ratio": 0.2, "export_final": False,
                  "async_checkpointing": False, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run(config_path: Path, *overrides, until_step=None, devices=None, messages=None):
    config = load_config(config_path, list(overrides))
    trainer = Trainer(config, progress=False, log=(messages.append if messages is not None else print),
                      devices=devices)
    return trainer, trainer.run(until_step=until_step)


def trainable(result):
    return {k: np.asarray(v) for k, v in result.final_state.trainable.items()}


@pytest.fixture(scope="module")
def straight(corpus, shared_folder):
    """A 6-step run without a stop, trained once per session (its losses and final trainable parameters)."""
    def train(folder):
        config = write_config(folder / "config.yaml", corpus, folder / "run")
        _, result = run(config)
        assert result.stopped_by == "max_steps"
        (folder / "losses.json").write_text(json.dumps(result.losses))
        np.savez(folder / "trainable.npz", **trainable(result))

    folder = shared_folder("train-straight", train)
    with np.load(folder / "trainable.npz") as stored:
        final = {key: stored[key] for key in stored.files}
    return json.loads((folder / "losses.json").read_text()), final


def test_exact_resume_after_stopping(straight, corpus, tmp_path):
    full_losses, full_trainable = straight
    assert len(full_losses) == 6 and full_losses[-1] < full_losses[0]
    resumable = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run")
    _, first = run(resumable, until_step=3)
    assert first.stopped_by == "until_step" and first.final_step == 3
    messages = []
    _, second = run(resumable, messages=messages)
    assert "resumed from checkpoint step 3" in messages
    assert second.final_step == 6
    # identical losses after the resume and bit-identical parameters at the end
    assert first.losses + second.losses == full_losses
    a, b = full_trainable, trainable(second)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigterm_saves_and_resume_is_exact(straight, corpus, tmp_path):
    full_losses, full_trainable = straight
    resumable = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run")
    env = dict(os.environ)
    process = subprocess.Popen([sys.executable, "-m", "omnimol_jax.cli", "train", "--config", str(resumable),
                                "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and any(json.loads(line)["step"] >= 1 for line in log.read_text().splitlines() if line):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGTERM, output  # stopped, not finished: the shell's convention
    assert "received SIGTERM" in output and "(signal)" in output, output
    stopped_at = int(output.split("stopped at step ")[1].split()[0])
    assert 1 <= stopped_at < 6
    messages = []
    _, resumed = run(resumable, messages=messages)
    assert f"resumed from checkpoint step {stopped_at}" in messages
    assert resumed.losses == full_losses[stopped_at:]
    for key, value in full_trainable.items():
        np.testing.assert_array_equal(trainable(resumed)[key], value, err_msg=key)


@pytest.fixture(scope="module")
def single_device(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    config = write_config(tmp / "config.yaml", corpus, tmp / "one", max_steps=5)
    trainer, result = run(config, "mesh.data=1", devices=jax.devices()[:1])
    frozen = [np.asarray(v) for v in jax.tree.leaves(trainer.program.frozen)]
    return config, result, frozen


# data2-fsdp2-tensor2 runs by default (data, fsdp and tensor axes at once); pure data parallelism is also what
# test_multiprocess checks across processes, and expert sharding is checked layer by layer in test_moge.
@pytest.mark.parametrize("mesh", [pytest.param((8, 1, 1, 1), id="data8", marks=pytest.mark.slow),
                                  pytest.param((2, 2, 2, 1), id="data2-fsdp2-tensor2"),
                                  pytest.param((2, 1, 1, 4), id="data2-expert4", marks=pytest.mark.slow)])
def test_sharded_training_matches_single_device(single_device, tmp_path, mesh):
    config, single, frozen_single = single_device
    overrides = [f"mesh.{axis}={size}" for axis, size in zip(("data", "fsdp", "tensor", "expert"), mesh)]
    sharded_trainer, sharded = run(config, f"train.output_dir={tmp_path / 'many'}", *overrides)
    assert len(single.losses) == len(sharded.losses) == 5
    np.testing.assert_allclose(sharded.losses, single.losses, atol=1e-5, rtol=0)
    # frozen weights never move, and are the same numbers however they are sharded
    for a, b in zip(jax.tree.leaves(sharded_trainer.program.frozen), frozen_single):
        np.testing.assert_array_equal(np.asarray(a), b)
    frozen_saved = sharded_trainer.output_dir / "frozen"
    assert (frozen_saved / "omnimol_checkpoint.json").is_file()
    if mesh[3] > 1:
        expert_a = sharded.final_state.trainable["language_model/layers/1/mlp/expert_gate_lora/a"]
        assert expert_a.sharding.spec[0] == "expert"


@pytest.mark.slow  # the every-checkpoint-unusable case of test_run_safety walks the same fallback
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", checkpoint_every=2)
    _, first = run(config, until_step=4)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    for item in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*"):
        if item.is_file() and item.stat().st_size > 0:
            item.write_bytes(b"\0" * 7)  # garbage in every file of the newest step
    messages = []
    _, resumed = run(config, messages=messages)
    assert any("checkpoint step 4" in m and "falling back" in m for m in messages), messages
    assert "resumed from checkpoint step 2" in messages and resumed.final_step == 6


def test_config_typo_fails_before_anything_is_compiled(corpus, tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run")
    with CompileWatch() as watch:
        assert cli_main(["train", "--config", str(config), "train.max_step=3"]) == 2
    assert "train.max_step: unknown key; did you mean 'max_steps'?" in capsys.readouterr().err
    assert watch.traces == 0 and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="train.profile_steps"):
        load_config(config, ["--profile_steps=15:10".lstrip("-").replace("profile_steps", "train.profile_steps")])


def test_nonfinite_steps_are_skipped_and_stop_the_run(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", max_consecutive_nonfinite=2)
    trainer = Trainer(load_config(config), progress=False)
    norm = trainer.program.frozen["language_model"]["norm"]["scale"]
    norm.set_value(norm.get_value() * np.nan)  # every loss is NaN from here on
    initial = {k: np.asarray(v) for k, v in trainer.program.trainable.items()}
    result = trainer.run()
    assert result.stopped_by == "nonfinite" and result.final_step == 2 and result.losses == []
    assert int(result.final_state.skipped_total) == 2
    for key, value in trainable(result).items():
        np.testing.assert_array_equal(value, initial[key])  # no update was applied
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_stage1_trains_only_the_projector(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", stage=1, max_steps=2)
    trainer = Trainer(load_config(config, ["model.lora.enabled=false", "model.moge.enabled=false"]), progress=False)
    initial = {k: np.asarray(v) for k, v in trainer.program.trainable.items()}  # the run donates these arrays
    result = trainer.run()
    assert initial and all(k.startswith("projector/") for k in initial)
    assert set(result.final_state.trainable) == set(initial)
    assert all(not np.array_equal(v, initial[k]) for k, v in trainable(result).items())


@pytest.mark.slow  # test_remat's unfrozen-backbone recipe trains through train.unfreeze by default
def test_unfreeze_trains_the_matching_backbone_parameters(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", max_steps=2,
                          unfreeze=["language_model/(embed_tokens|norm)/", "graph_tower/atom_encoder/"])
    trainer = Trainer(load_config(config), progress=False)
    initial = {k: np.asarray(v) for k, v in trainer.program.trainable.items()}
    frozen_paths = {"/".join(map(str, p)) for p, _ in __import__("flax").nnx.to_flat_state(trainer.program.frozen)}
    result = trainer.run()
    unfrozen = {k for k in initial if k.startswith(("language_model/", "graph_tower/")) and "_lora/" not in k
                and "router" not in k}
    tables = {f"graph_tower/atom_encoder/embeddings/{i}" for i in range(9)}
    assert unfrozen == {"language_model/embed_tokens/embedding", "language_model/norm/scale"} | tables
    assert not any(p.startswith(("language_model/embed_tokens/", "language_model/norm/")) for p in frozen_paths)
    assert any(p.startswith("language_model/layers/") for p in frozen_paths)  # the rest stays frozen
    changed = trainable(result)
    # The tower trains (the model does not stop its gradient); omnimol-mode graphs use 2 of the 9 atom tables.
    used = unfrozen - tables | {"graph_tower/atom_encoder/embeddings/0", "graph_tower/atom_encoder/embeddings/1"}
    assert all(not np.array_equal(changed[k], initial[k]) for k in used)
    with pytest.raises(ConfigError, match="train.unfreeze"):
        load_config(config, ["train.unfreeze=[(]"])


@pytest.mark.slow  # a whole traced run (a TensorBoard profile of two steps)
def test_profile_steps_write_a_trace_of_the_requested_steps(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", max_steps=3, profile_steps="1:3")
    messages: list[str] = []
    run(config, messages=messages)
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert any("profile of steps 1..2" in m for m in messages)


def test_stage2_starts_from_the_stage1_projector(corpus, tmp_path):
    from omnimol_jax.checkpoint import load_params

    stage1 = write_config(tmp_path / "stage1.yaml", corpus, tmp_path / "stage1", stage=1, max_steps=2,
                          export_final=True)
    run(stage1, "model.lora.enabled=false", "model.moge.enabled=false")
    stored = load_params(tmp_path / "stage1" / "final")
    exported = {"/".join(k): v for k, v in stored.items() if k[0] == "projector"}
    tower = [k for k in stored if k[0] == "graph_tower"]  # without MoleculeSTM weights, stage 1's tower comes along
    stage2 = write_config(tmp_path / "stage2.yaml", corpus, tmp_path / "stage2", max_steps=1)
    messages: list[str] = []
    trainer = Trainer(load_config(stage2, [f"init.projector={tmp_path / 'stage1' / 'final'}"]), progress=False,
                      log=messages.append)
    start = {k: np.asarray(v) for k, v in trainer.program.trainable.items() if k.startswith("projector/")}
    assert exported and set(start) == set(exported)
    for key, value in exported.items():
        np.testing.assert_array_equal(start[key], value)
    fresh = Trainer(load_config(stage2, [f"train.output_dir={tmp_path / 'fresh'}"]), progress=False,
                    log=lambda m: None)
    assert any(not np.array_equal(start[k], np.asarray(fresh.program.trainable[k])) for k in start)
    assert tower and any(f"{len(exported) + len(tower)} variables from" in m for m in messages)
    assert not any("calibrated" in m for m in messages)


def test_a_random_graph_tower_is_calibrated_and_a_loaded_one_kept(corpus, tmp_path):
    from omnimol_jax.checkpoint import flat_values

    def batch_stats(trainer):
        return {k: np.asarray(v) for k, v in flat_values(trainer.program.frozen).items() if k[0] == "graph_tower"
                and k[-1] in ("mean", "var")}

    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "random", max_steps=1, export_final=True)
    messages: list[str] = []
    trainer = Trainer(load_config(config), progress=False, log=messages.append)
    calibrated = batch_stats(trainer)
    assert len(calibrated) == 2 * 2 * 2  # 2 layers x (inner + outer norm) x (mean, var)
    assert any("batch norms calibrated on" in m for m in messages)
    assert all(np.abs(v).max() > 1e-3 for k, v in calibrated.items() if k[-1] == "mean")
    trainer.run()
    # A tower that comes from a checkpoint keeps its statistics, and calibration_graphs=0 keeps the defaults.
    loaded = Trainer(load_config(config, [f"init.checkpoint={tmp_path / 'random' / 'final'}",
                                          f"train.output_dir={tmp_path / 'loaded'}"]),
                     progress=False, log=messages.append)
    kept = batch_stats(loaded)
    assert kept.keys() == calibrated.keys()
    for key, value in kept.items():
        np.testing.assert_array_equal(value, calibrated[key])
    plain = batch_stats(Trainer(load_config(config, ["graph.calibration_graphs=0",
                                                     f"train.output_dir={tmp_path / 'plain'}"]),
                                progress=False, log=lambda m: None))
    assert plain.keys() == calibrated.keys()
    assert all(np.all(v == (0.0 if k[-1] == "mean" else 1.0)) for k, v in plain.items())


def test_a_task_without_test_records_leaves_validation_of_the_others_on(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    records = json.loads((data / "logp.json").read_text())
    (data / "logp.json").write_text(json.dumps([dict(r, metadata=dict(r["metadata"], split="train"))
                                                for r in records]))
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run")
    messages = []
    trainer = Trainer(load_config(config, [f"data.data_dir={data}"]), progress=False, log=messages.append)
    scalars = trainer.evaluate(trainer.program.trainable)
    assert any("validation leaves out 1 task(s) without test records: logp (no test records in" in m
               for m in messages), messages
    assert "task_loss/logp" not in scalars
    assert {"task_loss/weight", "task_loss/forward"} <= set(scalars) and scalars["supervised_tokens"] > 0
    trainer.evaluate(trainer.program.trainable)
    assert sum("validation leaves out" in m for m in messages) == 1  # said once
    trainer.run_directory.release()
