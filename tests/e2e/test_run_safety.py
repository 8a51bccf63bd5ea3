"""Run safety: a finished or interrupted run completes on rerun, one writer per run directory, config changes
are checked on resume, task files can be rebuilt under a reader, and every bad input is one line on stderr with a
non-zero exit and nothing left behind (a table over the inputs of issue #16, item 5), including a full disk."""
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from omnimol_jax.cli import main as cli_main
from omnimol_jax.compile_watch import CompileWatch
from omnimol_jax.config import load_config
from omnimol_jax.corpus import CorpusConfig, build_corpus
from omnimol_jax.data.pipeline import Pipeline
from omnimol_jax.data.readers import DataFormatError, open_task
from omnimol_jax.train.run_directory import LOCK_FILE, OWNER_FILE, RunDirectory
from omnimol_jax.train.trainer import Trainer

TASKS = ("weight", "logp", "forward")


@pytest.fixture(scope="module")
def corpus(shared_folder):
    # shared by both xdist workers: the finished run below stores this path in its config
    folder = shared_folder("run-safety-corpus", lambda f: build_corpus(
        f / "data", CorpusConfig(size=30, tasks=TASKS, tokenizer_vocab_size=400)))
    return folder / "data"


def write_config(path: Path, corpus: Path, output_dir: Path, **train) -> Path:
    config = {
        "model": {"preset": "tiny", "vocab_size": 1024, "lora": {"enabled": True, "rank": 4},
                  "moge": {"enabled": True, "layers": "second_half", "num_experts": 4}},
        "graph": {"num_layers": 2, "hidden_size": 32},
        "mesh": {"data": -1},
        "data": {"data_dir": str(corpus), "seq_len": 256, "global_batch_size": 8, "max_samples_per_row": 4,
                 "num_threads": 1, "prefetch_batches": 0},
        "train": {"output_dir": str(output_dir), "max_steps": 3, "log_every": 1, "checkpoint_every": 2,
                  "eval_batches": 1, "async_checkpointing": False, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished(corpus, shared_folder):
    """A finished run (checkpoints 2 and 3, final/), trained once per session and copied by the tests that change
    it."""
    def train(tmp):
        config = write_config(tmp / "config.yaml", corpus, tmp / "run")
        assert cli_main(["train", "--config", str(config), "--no-progress"]) == 0

    return shared_folder("run-safety-finished", train) / "run"


def copy_run(finished: Path, corpus: Path, tmp_path: Path, **train) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return write_config(tmp_path / "config.yaml", corpus, run_dir, **train), run_dir


def logged_steps(run_dir: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["kind"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


# ------------------------------------------------------------------------------------------------ 1: resume


def test_the_finished_run_logs_without_a_progress_bar_and_has_public_modes(finished, corpus, capsys):
    steps = logged_steps(finished)
    assert steps == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    for name in ("final", "frozen"):  # the user's umask, not mkdtemp's 0700
        assert (finished / name).stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert not (finished / OWNER_FILE).exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rerunning_a_finished_run_reports_it_complete(finished, corpus, tmp_path, capsys):
    config, run_dir = copy_run(finished, corpus, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    with CompileWatch() as watch:
        assert cli_main(["train", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already complete at step 3" in out and "compiled the train step" not in out
    assert watch.traces == 0  # nothing built: no program traced, whether or not the compile cache holds it
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_run_killed_after_its_last_checkpoint_finishes_on_rerun(finished, corpus, tmp_path, capsys):
    """What kill -9 during the final validation/export leaves: the step-3 checkpoint, no final/, a half-written
    export folder and the final eval not logged. Before the fix every rerun died with StepAlreadyExistsError."""
    config, run_dir = copy_run(finished, corpus, tmp_path)
    shutil.rmtree(run_dir / "final")
    (run_dir / ".final.partial-123-abcd" / "params").mkdir(parents=True)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    assert cli_main(["train", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from checkpoint step 3" in out and "stopped at step 3 (max_steps)" in out
    meta = json.loads((run_dir / "final" / "omnimol_checkpoint.json").read_text())
    assert meta["source"]["step"] == 3 and not list(run_dir.glob(".final.partial-*"))
    assert logged_steps(run_dir) == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    # and once more: now it is complete
    assert cli_main(["train", "--config", str(config), "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ 2: one writer


HOLD_LOCK = """
import sys, time
from omnimol_jax.train.run_directory import RunDirectory
held = RunDirectory(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_directory_refuses_and_a_dead_holder_does_not_block(finished, corpus, tmp_path,
                                                                                      capfd):
    config, run_dir = copy_run(finished, corpus, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run_dir)
        with CompileWatch() as watch:
            assert cli_main(["train", "--config", str(config), "--no-progress"]) == 1
        err = capfd.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {run_dir} is in use by another training run (pid {holder.pid} on ")
        assert "started 20" in err[-1] and "Traceback" not in "\n".join(err)
        assert watch.traces == 0 and tree(run_dir) == before  # refused at once: nothing built
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the directory can be taken at once.
    with RunDirectory(run_dir):
        assert json.loads((run_dir / OWNER_FILE).read_text())["pid"] == os.getpid()
    assert not (run_dir / OWNER_FILE).exists()


def test_a_failed_start_leaves_no_empty_run_directory(tmp_path):
    target = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with RunDirectory(target):
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    with RunDirectory(target):
        (target / "metrics.jsonl").write_text("{}\n")  # something written: a failure keeps it
    assert (target / "metrics.jsonl").exists() and (target / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------ 3: config contract


def test_resume_with_a_shape_change_stops_with_the_key_diff(finished, corpus, tmp_path, capfd):
    config, run_dir = copy_run(finished, corpus, tmp_path)
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "metrics.jsonl")}
    files = tree(run_dir)
    assert cli_main(["train", "--config", str(config), "--no-progress", "model.lora.rank=8",
                     "data.tasks=weight/logp"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "written with a different config: data.tasks: \"all\" -> \"weight/logp\", model.lora.rank: 4 -> 8" in err[0]
    assert "train.allow_config_change=[data.tasks,model.lora.rank]" in err[0]
    # the record of what the checkpoints hold is untouched
    assert {p: (run_dir / p).read_bytes() for p in before} == before and tree(run_dir) == files


@pytest.mark.slow  # resuming is checked exactly by test_train (stop, SIGTERM); this adds a changed max_steps
def test_resume_with_more_steps_applies_the_change_and_logs_it(finished, corpus, tmp_path, capsys):
    config, run_dir = copy_run(finished, corpus, tmp_path, max_steps=5, log_every=2)
    assert cli_main(["train", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "config changes applied on resume: train.log_every: 1 -> 2, train.max_steps: 3 -> 5" in out
    assert "resumed from checkpoint step 3" in out and "stopped at step 5 (max_steps)" in out
    assert "step 4/5: loss" in out  # --no-progress still logs the loss every log_every steps
    changes = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert changes[0]["step"] == 3 and changes[0]["changes"]["train.max_steps"] == [3, 5]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 5
    # `info` counts what `train` counts: the graph tower and projector too
    trainable, frozen = (int(n.replace(",", "")) for n in out.split("parameters: ")[1].split(" trainable, ")[0:2]
                         for n in [n.split()[0]])
    assert cli_main(["info", "--config", str(config)]) == 0
    assert f"# parameters: {trainable + frozen:,} (" in capsys.readouterr().out
    assert logged_steps(run_dir) == [(1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train"),
                                     (5, "train"), (5, "eval")]


def test_metrics_after_the_resumed_checkpoint_are_not_repeated(finished, corpus, tmp_path):
    """A run killed at step 3 before its step-3 checkpoint: the rerun resumes at 2 and logs step 3 once."""
    config, run_dir = copy_run(finished, corpus, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "3")
    shutil.rmtree(run_dir / "final")
    messages = []
    result = Trainer(load_config(config), progress=False, log=messages.append).run()
    assert "resumed from checkpoint step 2" in messages and result.final_step == 3
    assert logged_steps(run_dir) == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]


# ------------------------------------------------------------------------------------------------ 4: data files


def test_rebuilding_the_data_under_a_reader_does_not_crash_it(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    config = load_config(None, [f"data.data_dir={data}", "data.tasks=weight/logp", "data.seq_len=256",
                                "data.num_threads=1", "data.prefetch_batches=0", "data.global_batch_size=4"])
    pipeline = Pipeline(config.data)
    source = pipeline.sources[0]
    first = [source[i] for i in range(len(source))]
    iterator = pipeline.iterator()
    next(iterator)
    # Rebuilt with another seed: different records, written to new files and renamed over the old ones.
    build_corpus(data, CorpusConfig(size=30, tasks=("weight", "logp"), seed=7, tokenizer_vocab_size=400))
    assert open_task(data, "weight")[0] != first[0]
    for _ in range(6):
        next(iterator)  # still the old files' records, through the descriptors indexed
    assert [source[i] for i in range(len(source))] == first
    iterator.close()
    # A file truncated in place (not the way build-data writes) is reported, naming it, instead of a SIGBUS.
    victim = open_task(data, "logp")
    os.truncate(data / "logp.json", 10)
    with pytest.raises(DataFormatError, match=r"logp.json, record \d+: the file shrank"):
        victim[len(victim) - 1]
    assert not list(data.glob(".build-data.partial-*"))


def test_a_damaged_task_file_is_used_up_to_the_damage_when_not_strict(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    raw = (data / "logp.json").read_bytes()
    (data / "logp.json").write_bytes(raw[:len(raw) // 2])
    config = load_config(None, [f"data.data_dir={data}", "data.tasks=weight/logp", "data.seq_len=256"])
    pipeline = Pipeline(config.data)
    logp = pipeline.sources[1]
    assert "logp.json, record" in logp.damage and "cut off" in logp.damage
    assert 0 < len(logp) < len(open_task(corpus, "logp"))
    pipeline.check_records(say=lambda m: None)


def test_graph_tower_calibration_skips_molecules_training_rejects(corpus):
    config = load_config(None, [f"data.data_dir={corpus}", "data.tasks=weight/logp", "data.seq_len=256",
                                "data.nodes_per_row=20"])
    pipeline = Pipeline(config.data)
    graphs = pipeline.calibration_graphs(64)
    assert graphs and max(g.num_nodes for g in graphs) <= 20
    sizes = [g.num_nodes for g in Pipeline(load_config(None, [f"data.data_dir={corpus}", "data.tasks=weight/logp",
                                                              "data.seq_len=256"]).data).calibration_graphs(64)]
    assert max(sizes) > 20  # the budget, not the data, kept them small


def test_decoded_text_never_ends_in_half_a_character(corpus):
    from omnimol_jax.data.tokenizer import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(corpus / "tokenizer")
    ids = tokenizer.encode("caf\u00e9 \u4e2d\u6587 ok")
    cut = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    assert any(text.endswith("\ufffd") for text in cut)  # byte-level tokens split these characters
    whole = [tokenizer.decode_whole_characters(ids[:k]) for k in range(len(ids) + 1)]
    assert not any("\ufffd" in text for text in whole)
    assert all(("caf\u00e9 \u4e2d\u6587 ok").startswith(text) for text in whole) and whole[-1] == cut[-1]


# ------------------------------------------------------------------------------------------------ 5: bad input


def _damage(data: Path, kind: str) -> None:
    path = data / "logp.json"
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif kind == "malformed":
        cut = raw.index(b"},\n{", len(raw) // 2)
        path.write_bytes(raw[:cut] + b"},,\n{" + raw[cut + 4:])
    elif kind == "non_utf8":
        cut = raw.index(b'"output"', len(raw) // 3)
        path.write_bytes(raw[:cut + 12] + b"\xff\xfe" + raw[cut + 12:])
    elif kind == "bad_record":
        records = json.loads(raw)
        records[-1]["output"] = None
        path.write_text(json.dumps(records))
    elif kind == "every_record":
        path.write_text(json.dumps([dict(r, output=None) for r in json.loads(raw)]))


def _unusable_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "final")  # killed before the export: a complete final/ would answer "already complete"
    for item in (run_dir / "checkpoints").rglob("*"):
        if item.is_file() and item.stat().st_size > 0 and "state" in item.parts:
            item.write_bytes(b"\0" * 7)


def _list_prediction(out: Path) -> None:
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps({"id": "logp/0", "task": "logp", "prediction": ["1.0"],
                                                       "reference": "1.0"}) + "\n")


FRESH_TRAIN = ["train", "--config", "{config}", "train.output_dir={fresh}"]
# data.strict checks every record before compiling; two short molecule tasks and a long row, so only the damage
# planted in logp.json is bad.
STRICT_TRAIN = FRESH_TRAIN + ["data.strict=true", "data.data_dir={data}", "data.tasks=weight/logp",
                              "data.seq_len=1024"]
BAD_INPUTS = [
    # (id, argv template, setup, words the one-line error must contain, exit code)
    ("vocabulary-smaller-than-the-tokenizer", FRESH_TRAIN + ["model.vocab_size=300"], None,
     ["model.vocab_size: 300", "but the tokenizer at", "496 tokens"], 2),
    ("data-folder-without-task-files", FRESH_TRAIN + ["data.data_dir={tmp}/empty", "data.tasks=all"],
     lambda t: shutil.copytree(t["data"] / "tokenizer", t["tmp"] / "empty" / "tokenizer"),
     ["data.data_dir: no task files in", "empty"], 2),
    ("strict-bad-record", STRICT_TRAIN,
     lambda t: _damage(t["data"], "bad_record"), ["logp.json, record", "'output' is missing"], 2),
    ("truncated-file-strict", STRICT_TRAIN,
     lambda t: _damage(t["data"], "truncated"), ["logp.json, record", "cut off"], 2),
    ("malformed-file-strict", STRICT_TRAIN,
     lambda t: _damage(t["data"], "malformed"), ["logp.json", "invalid JSON"], 2),
    ("non-utf8-file-strict", STRICT_TRAIN,
     lambda t: _damage(t["data"], "non_utf8"), ["logp.json, record", "not valid UTF-8"], 2),
    ("every-record-of-a-task-unusable", FRESH_TRAIN + ["data.data_dir={data}"],
     lambda t: _damage(t["data"], "every_record"),
     ["task 'logp': every record of", "missing_field: ", "data.allow_empty_tasks=true"], 2),
    ("negative-eval-every", FRESH_TRAIN + ["train.eval_every=-5"], None, ["train.eval_every: must be >= 0"], 2),
    ("per-process-batch-key", FRESH_TRAIN + ["data.batch_size=4"], None,
     ["data.batch_size: no longer a key", "write data.global_batch_size"], 2),
    ("global-batch-not-divisible-by-micro-batches", FRESH_TRAIN + ["data.global_batch_size=6",
                                                                  "train.grad_accum_steps=4"], None,
     ["data.global_batch_size: 6 rows do not divide into train.grad_accum_steps=4"], 2),
    ("mesh-train", FRESH_TRAIN + ["mesh.data=3"], None,
     ["mesh data=3,fsdp=1,tensor=1,expert=1 needs 3 devices", "8 are available"], 2),
    ("mesh-generate", ["generate", "--checkpoint", "{final}", "--task", "logp", "--input", "CCO", "--mesh",
                       "data=3"], None, ["needs 3 devices"], 2),
    ("unknown-task-train", FRESH_TRAIN + ["data.tasks=weight/logpp"], None,
     ["data.tasks: unknown task 'logpp'", "did you mean 'logp'"], 2),
    ("unknown-task-generate", ["generate", "--checkpoint", "{final}", "--task", "logpp", "--input", "CCO"], None,
     ["unknown task 'logpp'"], 2),
    ("unknown-task-eval", ["eval", "--checkpoint", "{final}", "--data", "{data}", "--tasks", "logpp",
                           "--out", "{tmp}/eval"], None, ["unknown task 'logpp'"], 2),
    ("every-checkpoint-unusable", ["train", "--config", "{config}", "train.output_dir={run}"],
     lambda t: _unusable_checkpoints(t["run"]), ["no checkpoint in", "could be restored", "step 3", "step 2"], 1),
    ("check-hf-against-a-folder-that-is-not-hf", ["check-hf", "--checkpoint", "{final}", "--hf", "{tmp}"], None,
     ["config.json is missing"], 2),
    ("prediction-is-a-list", ["eval", "--checkpoint", "{final}", "--data", "{data}", "--tasks", "logp",
                              "--out", "{tmp}/eval"],
     lambda t: _list_prediction(t["tmp"] / "eval"), ["predictions.jsonl:1: 'prediction' must be a string, got list"],
     2),
    ("generate-from-a-language-model-without-a-tokenizer", ["generate", "--checkpoint", "{lm_only}", "--task", "logp",
                                                        "--input", "CCO"], None,
     ["no tokenizer.json at", "pass --tokenizer"], 2),
]


@pytest.fixture
def workspace(finished, corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    config, run_dir = copy_run(finished, corpus, tmp_path)
    lm_only = tmp_path / "lm_only"
    assert cli_main(["init", "--out", str(lm_only)]) == 0
    return {"tmp": tmp_path, "data": data, "config": config, "run": run_dir, "final": finished / "final",
            "lm_only": lm_only, "fresh": tmp_path / "new" / "run"}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_a_nonzero_exit_and_nothing_left_behind(case, workspace, capfd):
    _, argv, setup, words, code = case
    if setup:
        setup(workspace)
    capfd.readouterr()
    before = tree(workspace["tmp"])
    with CompileWatch() as watch:
        rc = cli_main([arg.format(**workspace) for arg in argv])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert rc == code, err
    assert "Traceback" not in out + err
    assert lines and lines[-1].startswith("error: ") and [ln for ln in lines if ln.startswith("error:")] == lines[-1:]
    for word in words:
        assert word in lines[-1], lines[-1]
    assert "compiled the train step" not in out
    if code == 2:  # bad input is found before anything is compiled; a run failure (1) may need the model built
        assert watch.compiles == 0, watch
    assert tree(workspace["tmp"]) - before <= {"run/" + LOCK_FILE}, "files left behind"


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (skips the test where `mount` is not allowed, e.g. not root)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs root (mount) for a small or read-only tmpfs")
    try:
        yield path
    finally:
        gc.collect()  # a failed save's writers may still hold files open: -l detaches the mount regardless
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_the_read_only_output_directory_is_one_line(finished, corpus, tmp_path, capfd):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as target:
        config = write_config(tmp_path / "config.yaml", corpus, target / "run")
        assert cli_main(["train", "--config", str(config), "--no-progress"]) == 2
        lines = capfd.readouterr().err.strip().splitlines()
        assert lines[-1] == f"error: train.output_dir: cannot create {target / 'run'}: Read-only file system"


# ------------------------------------------------------------------------------------------------ disk full


def test_a_full_disk_during_a_save_says_so_and_the_previous_checkpoint_restores(finished, corpus, tmp_path, capfd):
    with tmpfs(tmp_path / "small", "size=24m") as mount:
        run_dir = mount / "run"
        shutil.copytree(finished, run_dir)
        shutil.rmtree(run_dir / "final")
        shutil.rmtree(run_dir / "checkpoints" / "3")
        config = write_config(tmp_path / "config.yaml", corpus, run_dir, max_steps=4, checkpoint_every=1)
        # Fill the disk, leaving a little room: the small logs fit, the next checkpoint does not.
        filler = mount / "filler"
        free = shutil.disk_usage(mount).free
        with open(filler, "wb") as f:
            f.write(b"\0" * (free - 96 * 1024))
        # Separate processes, as a real rerun: the failed save's writer threads die with their process.
        command = [sys.executable, "-m", "omnimol_jax.cli", "train", "--config", str(config), "--no-progress"]
        failed = subprocess.run(command, capture_output=True, text=True, timeout=600)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert "Traceback" not in failed.stdout + failed.stderr
        assert lines[-1].startswith("error: saving the checkpoint of step 3 in "), lines[-1]
        assert "disk full" in lines[-1] and "the previous checkpoint (step 2) is intact" in lines[-1]
        filler.unlink()
        resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from checkpoint step 2" in resumed.stdout and "stopped at step 4 (max_steps)" in resumed.stdout
