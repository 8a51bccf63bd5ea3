"""Grain pipeline: mixture proportions, per-epoch shuffling, process shards, exact restore, labels, packing,
bad-record accounting and device placement."""
import collections
import json

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omnimol_jax import corpus, tasks
from omnimol_jax.config import ConfigError, DataConfig
from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from omnimol_jax.data import molecules, prompts, readers
from omnimol_jax.data.loader import globalize_graph_indices
from omnimol_jax.data.packing import batch_statistics
from omnimol_jax.data.pipeline import Pipeline
from omnimol_jax.data.prompts import generation_example
from omnimol_jax.data.tokenizer import load_chat_tokenizer

SIZE = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline_corpus")
    corpus.build_corpus(out, corpus.CorpusConfig(seed=0, size=SIZE, tokenizer_vocab_size=1024))
    return out


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return load_chat_tokenizer(data_dir / "tokenizer")


def make_config(data_dir, **overrides):
    values = dict(data_dir=str(data_dir), seq_len=256, global_batch_size=4, process_index=0, process_count=1,
                  prefetch_batches=0, num_threads=1)
    values.update(overrides)
    return DataConfig(**values)


def leaves(batch):
    return [np.asarray(x) for x in jax.tree.leaves(batch)]


def test_a_mixture_is_a_task_list_with_values():
    parse = tasks.parse_task_list
    assert parse("forward:1/retrosynthesis:0.5", "concat") == [("forward", 1.0), ("retrosynthesis", 0.5)]
    assert parse("forward:2/logp:0.5", "weighted") == [("forward", 2.0), ("logp", 0.5)]
    assert parse("molcap/iupac", "concat") == [("molcap", 1.0), ("iupac", 1.0)]
    with pytest.raises(tasks.TaskListError, match="fraction in \\(0, 1\\]"):
        parse("forward:2", "concat")
    with pytest.raises(ConfigError, match="data.tasks: unknown task .forwad.; did you mean .forward."):
        DataConfig(tasks="forwad:1").validate()
    with pytest.raises(ConfigError, match="data.tasks: a task appears twice"):
        DataConfig(tasks="logp/logp").validate()


def test_all_and_paper_task_sets(data_dir, tokenizer):
    everything = Pipeline(make_config(data_dir), tokenizer).task_keys
    assert set(everything) == set(corpus.BUILTIN_TASKS)
    assert Pipeline(make_config(data_dir, tasks="paper"), tokenizer).task_keys == [
        t for t in everything if t != "complexity"]


def test_weighted_mixture_proportions_over_10k_samples(data_dir, tokenizer):
    pipeline = Pipeline(make_config(data_dir, tasks="forward:2/logp:0.5/molcap:1/iupac:0.5", mixture="weighted"),
                        tokenizer)
    stream = pipeline.index_dataset()
    counts = collections.Counter(pipeline.task_keys[stream[i][0]] for i in range(10_000))
    total_weight = 4.0
    for task, weight in zip(pipeline.task_keys, pipeline.values):
        assert abs(counts[task] / 10_000 - weight / total_weight) < 0.02, (task, counts)
    # each task is reshuffled per pass over it: forward's first 2 passes cover its records twice
    forward = [stream[i][1] for i in range(4000) if stream[i][0] == 0][: 2 * (SIZE - 4)]
    first, second = forward[: SIZE - 4], forward[SIZE - 4:]
    assert sorted(first) == sorted(second) == list(range(SIZE - 4)) and first != second


def test_concat_mixture_subsamples_like_the_reference_and_reshuffles_per_epoch(data_dir, tokenizer):
    pipeline = Pipeline(make_config(data_dir, tasks="forward:1/retrosynthesis:0.5/weight:0.25", num_epochs=2),
                        tokenizer)
    stream = list(pipeline.index_dataset())
    sizes = pipeline.task_sizes
    epoch = sizes["forward"] + round(sizes["retrosynthesis"] * 0.5) + round(sizes["weight"] * 0.25)
    assert len(stream) == 2 * epoch
    first, second = stream[:epoch], stream[epoch:]
    picked = lambda part: sorted((t, r) for t, r, _ in part)  # noqa: E731
    assert picked(first) == picked(second)  # the same subset in both epochs (drawn once) ...
    assert [(t, r) for t, r, _ in first] != [(t, r) for t, r, _ in second]  # ... in another order
    per_task = collections.Counter(t for t, _, _ in first)
    assert per_task == {0: sizes["forward"], 1: round(sizes["retrosynthesis"] * 0.5),
                        2: round(sizes["weight"] * 0.25)}
    assert [p for _, _, p in stream] == list(range(2 * epoch))


def test_two_processes_see_disjoint_shards(data_dir, tokenizer):
    config = dict(tasks="weight/logp/molcap", num_epochs=1)
    shards = [Pipeline(make_config(data_dir, process_index=i, process_count=2, **config), tokenizer)
              for i in range(2)]
    full = list(Pipeline(make_config(data_dir, **config), tokenizer).index_dataset())
    seen = [list(p.index_dataset()) for p in shards]
    positions = [{pos for _, _, pos in part} for part in seen]
    assert not positions[0] & positions[1]
    assert sorted(seen[0] + seen[1], key=lambda e: e[2]) == full
    keys = [{(t, r) for t, r, _ in part} for part in seen]
    assert not keys[0] & keys[1]  # within one epoch no record reaches both processes
    assert [p.batch_rows for p in shards] == [2, 2]  # data.global_batch_size=4 over two processes
    batches = [next(p.iterator()) for p in shards]
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2]
    assert not np.array_equal(batches[0]["input_ids"], batches[1]["input_ids"])


def test_labels_cover_only_the_answer_and_slots_match_atoms(data_dir, tokenizer):
    config = make_config(data_dir, tasks="homolumo/iupac", batching="pad", shuffle=False, num_epochs=1,
                         global_batch_size=4)
    pipeline = Pipeline(config, tokenizer)
    expected = [("homolumo", r) for r in pipeline.sources[0]] + [("iupac", r) for r in pipeline.sources[1]]
    rows = []
    for batch in pipeline.iterator():
        for b in range(config.global_batch_size):
            if batch["segment_ids"][b].any():
                rows.append((batch, b))
    assert len(rows) == len(expected)
    for (task, record), (batch, b) in zip(expected, rows):
        spec = tasks.get_task(task)
        labels, ids = batch["labels"][b], batch["input_ids"][b]
        supervised = labels != IGNORE_INDEX
        assert tokenizer.decode(labels[supervised]) == prompts.answer_text(spec, record) + "<|eot_id|>"
        assert (labels[supervised] == ids[supervised]).all()
        # supervision is one contiguous block ending right after the answer
        where = np.flatnonzero(supervised)
        assert (np.diff(where) == 1).all() and where[-1] == batch["segment_ids"][b].sum() - 1
        slots = int((ids == IMAGE_TOKEN_ID).sum())
        atoms = molecules.graph_for(spec.graph_rule, record["input"], record).num_nodes if spec.has_graph else 0
        assert slots == atoms == int((batch["graphs"].node_sample_index == b).sum())
        assert (slots > 0) == spec.has_graph
        assert (labels[ids == IMAGE_TOKEN_ID] == IGNORE_INDEX).all()
        task_index = pipeline.task_keys.index(task)  # batch task ids index the mixture's task list
        assert batch["task_ids"][b, 0] == task_index
        assert (batch["token_task_ids"][b][batch["segment_ids"][b] > 0] == task_index).all()
        # the decoded prompt is the chat text of docs/omnimol.md §5 with the placeholder expanded
        text = tokenizer.decode(np.where(ids == IMAGE_TOKEN_ID, -1, ids)[batch["segment_ids"][b] > 0])
        assert text == prompts.chat_text(spec, record).replace("<image>", "").replace(
            "<|begin_of_text|>", "<|begin_of_text|><|begin_of_text|>", 1)


def test_packed_batches_are_consistent_and_dense(data_dir, tokenizer):
    stats = {}
    for mode in ("pack", "bucket", "pad"):
        pipeline = Pipeline(make_config(data_dir, batching=mode, global_batch_size=4, seq_len=384), tokenizer)
        iterator = pipeline.iterator()
        shares = []
        for _ in range(10):
            batch = next(iterator)
            shares.append(batch_statistics(batch)["real_token_share"])
            seg, pos = batch["segment_ids"], batch["positions"]
            assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape[0] == 4
            graph_rows = batch["graphs"].node_sample_index
            for b in range(4):
                # positions restart at 0 in every segment; slots of a row = its atoms
                for s in range(1, seg[b].max() + 1):
                    assert (pos[b][seg[b] == s] == np.arange((seg[b] == s).sum())).all()
                assert (batch["input_ids"][b] == IMAGE_TOKEN_ID).sum() == (graph_rows == b).sum()
                assert (batch["attention_mask"][b] == (seg[b] > 0)).all()
                used = batch["task_ids"][b] >= 0
                assert used.sum() == seg[b].max()
                for s in range(1, seg[b].max() + 1):
                    assert (batch["token_task_ids"][b][seg[b] == s] == batch["task_ids"][b][s - 1]).all()
            if mode == "pack":
                assert seg.shape == (4, 384) and batch["task_ids"].shape == (4, 8)
        stats[mode] = float(np.mean(shares))
    assert stats["pack"] > 0.75 and stats["pack"] > stats["bucket"] > stats["pad"]


@pytest.mark.parametrize("mode", ["pack", "bucket", "pad"])
def test_restore_gives_exactly_the_uninterrupted_batches(data_dir, tokenizer, mode):
    config = make_config(data_dir, batching=mode, bucket_window_batches=3, pack_window_batches=2,
                         prefetch_batches=2)
    reference = Pipeline(config, tokenizer).iterator()
    expected = [leaves(next(reference)) for _ in range(12)]
    reference.close()
    interrupted = Pipeline(config, tokenizer).iterator()
    for _ in range(5):
        next(interrupted)
    state = interrupted.get_state()
    interrupted.close()
    restored = Pipeline(config, tokenizer).iterator()
    restored.set_state(state)
    got = [leaves(next(restored)) for _ in range(7)]
    restored.close()
    for want, have in zip(expected[5:], got):
        assert len(want) == len(have) and all(np.array_equal(w, h) for w, h in zip(want, have))


def test_restore_through_grain_checkpoint_handler(data_dir, tokenizer, tmp_path):
    config = make_config(data_dir, prefetch_batches=1)
    iterator = Pipeline(config, tokenizer).iterator()
    for _ in range(3):
        next(iterator)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, iterator)
    expected = leaves(next(iterator))
    iterator.close()
    fresh = Pipeline(config, tokenizer).iterator()
    handler.restore(tmp_path, fresh)
    assert all(np.array_equal(a, b) for a, b in zip(expected, leaves(next(fresh))))
    fresh.close()


@pytest.mark.slow
def test_restore_with_worker_processes(data_dir, tokenizer):
    config = make_config(data_dir, num_workers=2, prefetch_batches=2)
    reference = Pipeline(config, tokenizer).iterator()
    expected = [leaves(next(reference)) for _ in range(8)]
    state = None
    reference.close()
    run = Pipeline(config, tokenizer).iterator()
    for _ in range(3):
        next(run)
    state = run.get_state()
    run.close()
    restored = Pipeline(config, tokenizer).iterator()
    restored.set_state(state)
    for want in expected[3:]:
        assert all(np.array_equal(w, h) for w, h in zip(want, leaves(next(restored))))
    restored.close()


def _write(path, records):
    path.write_text(json.dumps(records))


def test_bad_records_are_counted_per_task_and_reason(data_dir, tokenizer, tmp_path):
    good = json.loads((data_dir / "homolumo.json").read_text())[:6]
    for record in good:
        record["metadata"]["split"] = "train"
    bad = [
        {**good[0], "input": "[C][Ring3][=Branch9]x"},  # unparseable molecule
        {k: v for k, v in good[1].items() if k != "output"},  # missing field
        {**good[2], "output": {"value": 1}},  # wrong type
        {**good[3], "output": ""},  # empty answer
        {**good[4], "input": "[C]" * 300},  # too long
    ]
    _write(tmp_path / "homolumo.json", good[:3] + bad + good[3:])
    weight = json.loads((data_dir / "weight.json").read_text())[:4]
    for record in weight:
        record["metadata"]["split"] = "train"
    _write(tmp_path / "weight.json", weight + [{**weight[0], "input": "[N+5]("}])
    config = make_config(tmp_path, tasks="homolumo/weight", batching="pad", num_epochs=1, seq_len=512)
    iterator = Pipeline(config, tokenizer).iterator()
    samples = sum(int((b["task_ids"] >= 0).sum()) for b in iterator)
    assert samples == len(good) + len(weight)
    assert iterator.stats.by_task() == {
        "homolumo": {"unparseable_molecule": 1, "missing_field": 1, "wrong_type": 1, "empty_answer": 1,
                     "too_long": 1},
        "weight": {"unparseable_molecule": 1}}
    example = iterator.stats.examples["homolumo/missing_field"][0]
    assert str(tmp_path / "homolumo.json") in example and "record 4" in example
    # counts survive a checkpoint
    state = json.loads(iterator.get_state())
    assert sum(c for _, _, c in state["bad_records"]["counts"]) == 6

    strict = Pipeline(make_config(tmp_path, tasks="homolumo", batching="pad", num_epochs=1, shuffle=False,
                                  strict=True, seq_len=512), tokenizer).iterator()
    with pytest.raises(readers.RecordError, match=r"homolumo\.json, record 3: \[homolumo\] unparseable_molecule"):
        for _ in strict:
            pass


def test_overlong_samples_are_rejected_or_truncated_and_counted_per_task(data_dir, tokenizer, tmp_path):
    good = json.loads((data_dir / "molcap.json").read_text())[:4]
    for record in good:
        record["metadata"]["split"] = "train"
    long_answer = {**good[0], "output": "The molecule is an acid. " * 80}  # the answer crosses seq_len
    long_prompt = {**good[1], "input": "[C]" * 300}  # the graph alone fills seq_len: no answer token would fit
    _write(tmp_path / "molcap.json", good + [long_answer, long_prompt])
    outcomes = {}
    for mode in ("reject", "truncate"):
        config = make_config(tmp_path, tasks="molcap", batching="pad", num_epochs=1, shuffle=False, overlong=mode,
                             nodes_per_row=320, edges_per_row=700)  # the atom budget lets the 300-atom graph in
        iterator = Pipeline(config, tokenizer).iterator()
        rows = [(ids, labels) for b in iterator for ids, labels, task in
                zip(np.asarray(b["input_ids"]), np.asarray(b["labels"]), np.asarray(b["task_ids"]))
                if (task >= 0).any()]
        outcomes[mode] = rows, iterator.stats
    rows, stats = outcomes["reject"]
    assert len(rows) == len(good)
    assert stats.by_task() == {"molcap": {"too_long": 2}} and stats.truncated_by_task() == {}
    assert stats.overlong_by_task() == {"molcap": 2}
    rows, stats = outcomes["truncate"]
    assert len(rows) == len(good) + 1
    assert stats.by_task() == {"molcap": {"too_long": 1}} and stats.truncated_by_task() == {"molcap": 1}
    assert stats.overlong_by_task() == {"molcap": 2} and stats.total == 1
    assert "answer token is left" in stats.examples["molcap/too_long"][0]
    # the kept sample fills the row, its answer supervised up to the cut
    full = [(ids, labels) for ids, labels in rows if (ids != tokenizer.pad_id).all()]
    assert len(full) == 1 and full[0][1][-1] != IGNORE_INDEX
    assert tokenizer.decode([t for t in full[0][1] if t != IGNORE_INDEX]).startswith("The molecule is an acid.")
    with pytest.raises(ValueError, match=r"data.overlong"):
        make_config(tmp_path, overlong="drop").validate()


def test_device_placement_with_a_batch_sharding(data_dir, tokenizer):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    pipeline = Pipeline(make_config(data_dir, global_batch_size=8, prefetch_batches=2), tokenizer)
    host = next(pipeline.iterator())
    iterator = pipeline.iterator(sharding)
    batch = next(iterator)
    assert isinstance(batch["input_ids"], jax.Array)
    assert batch["input_ids"].sharding.spec == PartitionSpec("data", None)
    assert len(batch["input_ids"].sharding.device_set) == 8
    assert batch["graphs"].graphs.nodes.sharding.spec == PartitionSpec("data", None)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(leaves(host), leaves(batch)))
    iterator.close()


def test_globalized_graph_indices_for_multi_process_batches(data_dir, tokenizer):
    batch = next(Pipeline(make_config(data_dir), tokenizer).iterator())
    graphs = batch["graphs"]
    shifted = globalize_graph_indices(graphs, batch_size=4, process_index=3)
    nodes = graphs.node_sample_index.shape[0]
    assert (shifted.graphs.senders == graphs.graphs.senders + 3 * nodes).all()
    real = graphs.node_sample_index >= 0
    assert (shifted.node_sample_index[real] == graphs.node_sample_index[real] + 12).all()
    assert (shifted.node_sample_index[~real] == -1).all()


def test_generation_example_ends_at_the_assistant_header(data_dir, tokenizer):
    record = json.loads((data_dir / "molcap.json").read_text())[0]
    example = generation_example(tasks.get_task("molcap"), record, tokenizer)
    text = tokenizer.decode(example.input_ids[example.input_ids >= 0])
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert (example.input_ids == IMAGE_TOKEN_ID).sum() == example.graph.num_nodes
    assert example.reference == record["output"]


def test_a_stream_in_which_nothing_fits_fails_with_the_reasons(data_dir, tokenizer):
    from omnimol_jax.data.rejections import NoUsableSamplesError

    config = make_config(data_dir, tasks="weight/logp", seq_len=16, global_batch_size=2, max_consecutive_rejections=50)
    iterator = Pipeline(config, tokenizer).iterator()
    with pytest.raises(NoUsableSamplesError,
                       match=r"the last 50 records were all rejected \((weight|logp)/too_long: \d+.*too_long.*"
                             r"Check data.seq_len"):
        next(iterator)
    iterator.close()


def _release_folder(folder, name_of):
    """Every task's record (tests/data_records.py) x 4, train split, in files named by `name_of(spec)`; records
    that share a file (older releases' 3d_moit.json) keep their metadata.task."""
    from tests.data_records import RECORDS

    files = collections.defaultdict(list)
    for key, record in RECORDS.items():
        spec = tasks.get_task(key)
        metadata = dict(record.get("metadata", {}), split="train")
        if spec.release_metadata_task:
            metadata["task"] = spec.release_metadata_task
        files[name_of(spec)].extend([dict(record, metadata=metadata)] * 4)
    folder.mkdir()
    for name, records in files.items():
        (folder / f"{name}.json").write_text(json.dumps(records))
    return folder


@pytest.mark.parametrize("names", ["current", "older"])
def test_every_task_is_found_under_the_release_file_names_and_yields_batches(names, tmp_path, tokenizer):
    """docs/omnimol.md §8: the current release names each task's file (Molecular_Weight, IUPAC2SELFIES, ...); the
    older releases matched substrings (3d_moit holding several tasks, yields_regression, molcap_train, ...)."""
    older = {"homolumo": "property_prediction", "yield": "yields_regression", "molcap": "molcap_train",
             "iupac": "iupac_to_selfies", "forward": "forward_reaction"}
    if names == "current":
        folder = _release_folder(tmp_path / "release", lambda spec: spec.release_name or spec.release_file_key)
    else:
        folder = _release_folder(tmp_path / "release", lambda spec: older.get(spec.key, spec.release_file_key))
    # found by the release names; only these files happen to be named like our <task>.json convention
    same_name = {"current": ["molcap", "retrosynthesis", "scf"],
                 "older": ["catalyst", "reagent", "retrosynthesis", "scf", "solvent"]}[names]
    assert sorted(key for key in tasks.TASK_KEYS if (folder / f"{key}.json").exists()) == same_name
    assert set(readers.available_tasks(folder)) == set(tasks.TASK_KEYS)
    for key in tasks.TASK_KEYS:
        path, _ = readers.find_task_file(folder, key)
        assert len(readers.open_task(folder, key)) == 4, (key, path.name)
    config = make_config(folder, tasks="paper", seq_len=512, max_samples_per_row=2, global_batch_size=8)
    batch = next(Pipeline(config, tokenizer).iterator())
    assert np.asarray(batch["attention_mask"]).sum() > 0


def test_a_missing_task_file_names_what_was_looked_for_and_what_is_there(tmp_path):
    (tmp_path / "LogP.json").write_text("[]")
    with pytest.raises(FileNotFoundError) as info:
        readers.find_task_file(tmp_path, "weight")
    message = str(info.value)
    assert "looked for weight.json, Molecular_Weight.json, *3d_moit*.json" in message
    assert "the folder has LogP.json" in message


def test_without_graph_tokens_molecules_are_text_only(data_dir, tokenizer):
    """data.graph_tokens=false (the graph ablation): no placeholder, no graph slot, no atom; the SELFIES stays."""
    with_graphs = Pipeline(make_config(data_dir, tasks="homolumo"), tokenizer)
    without = Pipeline(make_config(data_dir, tasks="homolumo", graph_tokens=False), tokenizer)
    record = with_graphs.sources[0][0]
    sample, text_only = with_graphs.builder.build(0, 0), without.builder.build(0, 0)
    assert (sample["input_ids"] == IMAGE_TOKEN_ID).sum() > 0 and len(sample["node_features"]) > 0
    assert (text_only["input_ids"] != IMAGE_TOKEN_ID).all() and len(text_only["node_features"]) == 0
    assert tokenizer.decode(text_only["input_ids"]).count(record["input"]) == 1
    spec = tasks.without_graph(tasks.get_task("homolumo"))
    assert prompts.user_message(spec, record) == prompts.user_text(spec, record)  # no "<image>\n" line
    assert without.calibration_graphs(8) == []  # a random tower has nothing to calibrate on
