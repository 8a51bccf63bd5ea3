"""Streaming JSON-array reader, task file discovery, split/task filtering and record checks."""
import json
import pickle
import random
import tracemalloc

import pytest

from omnimol_jax import tasks
from omnimol_jax.data import readers
from omnimol_jax.data.readers import DataFormatError, JsonArrayWriter, TaskRecords, iter_json_array


def _records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append({"instruction": "Propriété é ü 分子 " * rng.randint(0, 3) + "x" * rng.randint(0, 200),
                    "input": "[C]" * rng.randint(1, 40), "output": rng.choice([rng.random(), "[O]", -3]),
                    "metadata": {"split": rng.choice(["train", "test"]), "task": rng.choice(["LogP", "Complexity"]),
                                 "i": i}})
    return out


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("chunk", [7, 1000, 1 << 20])
def test_stream_round_trips_with_exact_byte_spans(tmp_path, indent, chunk):
    records = _records(300)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    raw = path.read_bytes()
    elements = list(iter_json_array(path, chunk_chars=chunk))
    assert [e.value for e in elements] == records
    assert [e.index for e in elements] == list(range(300))
    for element in elements:
        assert json.loads(raw[element.byte_start:element.byte_end]) == element.value


def test_writer_output_reads_back(tmp_path):
    records = _records(50)
    with JsonArrayWriter(tmp_path / "w.json") as writer:
        for record in records:
            writer.write(record)
    assert json.loads((tmp_path / "w.json").read_text(encoding="utf-8")) == records
    assert list(readers.read_json_records(tmp_path / "w.json")) == records
    (tmp_path / "empty.json").write_text(" [ \n ] ")
    assert list(iter_json_array(tmp_path / "empty.json")) == []


@pytest.mark.parametrize("text,message,index", [
    ('[{"a": 1}, {"b": 2}, {"c": ', "unexpected end of file|invalid JSON|cut off", 2),
    ('[{"a": 1} {"b": 2}]', "expected ',' or ']'", 1),
    ('{"a": 1}', "expected a JSON array", None),
    ('[{"a": 1},]', "trailing comma", 1),
    ('[{"a": 1}, {"b": tru}]', "invalid JSON", 1),
])
def test_malformed_files_name_file_and_record(tmp_path, text, message, index):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message) as info:
        list(iter_json_array(path, chunk_chars=4))
    assert str(path) in str(info.value)
    assert info.value.record_index == index
    if index is not None:
        assert f"record {index}" in str(info.value)


def test_bytes_that_are_not_utf8_make_only_their_record_unusable(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"a": "caf\xe9"}, {"b": "ok \xc3\xa9"}]')
    elements = list(iter_json_array(path))
    assert len(elements) == 2 and elements[1].value == {"b": "ok \u00e9"}
    records = readers.TaskRecords(path, "weight", None)
    assert records[1] == {"b": "ok \u00e9"}  # byte spans stay exact after the bad byte
    with pytest.raises(UnicodeDecodeError):
        records[0]


def test_indexing_a_large_file_keeps_memory_small(tmp_path):
    # ~12 MB of records; the index must not hold them: peak Python allocation stays near one chunk.
    path = tmp_path / "big.json"
    record = {"instruction": "Please provide the HOMO energy value for this molecule.",
              "input": "[C][C][O][C][C][Branch1][C][C][C][Branch1][C][C][C]" * 4, "output": "-0.2482"}
    with JsonArrayWriter(path) as writer:
        for i in range(40000):
            writer.write({**record, "metadata": {"split": "train" if i % 10 else "test", "id": i}})
    assert path.stat().st_size > 10e6
    tracemalloc.start()
    index = TaskRecords(path, "homolumo", "test")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index) == 4000
    assert peak < 6e6, f"indexing peaked at {peak / 1e6:.1f} MB"
    assert index[123]["metadata"]["id"] == 1230 and index.record_index(123) == 1230


def test_task_records_filter_split_and_shared_file_task(tmp_path):
    records = _records(200, seed=3)
    path = tmp_path / "3d_moit_all.json"
    path.write_text(json.dumps(records))
    logp = TaskRecords(path, "logp", "test", metadata_task="LogP")
    expected = [r for r in records if r["metadata"]["split"] == "test" and r["metadata"]["task"] == "LogP"]
    assert list(logp) == expected and len(logp) > 10
    assert [logp.record_index(i) for i in range(len(logp))] == [r["metadata"]["i"] for r in expected]
    clone = pickle.loads(pickle.dumps(logp))
    assert clone[5] == expected[5]
    with pytest.raises(IndexError):
        logp[len(logp)]
    everything = TaskRecords(path, "logp", None)
    assert len(everything) == 200 and everything.num_in_file == 200


def test_find_task_file_follows_release_names(tmp_path):
    data = tmp_path / "omni"
    data.mkdir()
    for name in ("forward_train_test.json", "molcap_train_data.json", "3d_moit.json", "property_pred.json",
                 "exp_procedure_pred_0.5subset.json"):
        (data / name).write_text("[]")
    assert readers.find_task_file(data, "forward") == (data / "forward_train_test.json", None)
    assert readers.find_task_file(data, "molcap") == (data / "molcap_train_data.json", None)
    assert readers.find_task_file(data, "homolumo") == (data / "property_pred.json", None)
    assert readers.find_task_file(data, "experiment")[0].name == "exp_procedure_pred_0.5subset.json"
    for task, value in [("weight", "Molecular Weight"), ("logp", "LogP"), ("dqa", "Description"),
                        ("tpsa", "Topological Polar Surface Area"), ("complexity", "Complexity")]:
        assert readers.find_task_file(data, task) == (data / "3d_moit.json", value)
    # our own per-task file wins and is not filtered
    (data / "logp.json").write_text("[]")
    assert readers.find_task_file(data, "logp") == (data / "logp.json", None)
    (data / "forward_extra.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="several files for task 'forward'"):
        readers.find_task_file(data, "forward")
    with pytest.raises(FileNotFoundError, match=r"looked for yield.json, yield_regression.json, "
                                                r"\*yields_regression\*.json; the folder has 3d_moit.json"):
        readers.find_task_file(data, "yield")
    assert set(readers.available_tasks(data)) == {"molcap", "homolumo", "experiment", "weight", "logp", "dqa",
                                                  "tpsa", "complexity"}


def test_mol_instructions_layout(tmp_path):
    folder = tmp_path / "Molecule-oriented_Instructions"
    folder.mkdir()
    record = {"instruction": "Please provide the HOMO energy value for this molecule.", "input": "[C][O]",
              "output": "-0.25", "metadata": {"split": "test"}}
    (folder / "property_prediction.json").write_text(json.dumps([record, {**record, "metadata": {"split": "train"}}]))
    (folder / "forward_reaction_prediction.json").write_text("[]")
    source = readers.open_task(tmp_path, "homolumo", "test", layout="mol_instructions")
    assert list(source) == [record]
    assert readers.available_tasks(tmp_path, "mol_instructions") == ["forward", "homolumo"]
    with pytest.raises(FileNotFoundError, match="not part of Mol-Instructions"):
        readers.find_task_file(tmp_path, "weight", "mol_instructions")


@pytest.mark.parametrize("task,record,reason", [
    ("forward", {"instruction": "x", "input": "[C]"}, readers.REASON_MISSING_FIELD),
    ("forward", {"instruction": "x", "input": 5, "output": "[C]"}, readers.REASON_WRONG_TYPE),
    ("forward", {"instruction": "x", "input": "[C]", "output": "  "}, readers.REASON_EMPTY_ANSWER),
    ("forward", {"instruction": "x", "input": "[C]", "output": "CCO"}, readers.REASON_WRONG_TYPE),
    ("homolumo", {"instruction": "x", "input": "[C]", "output": "high"}, readers.REASON_WRONG_TYPE),
    ("homolumo", {"instruction": "x", "input": "[C]", "output": True}, readers.REASON_WRONG_TYPE),
    ("experiment", {"instruction": "x", "input": "$1$", "output": "ADD"}, readers.REASON_MISSING_FIELD),
    ("logp", ["not", "an", "object"], readers.REASON_MALFORMED),
])
def test_check_record_reasons(task, record, reason):
    assert readers.check_record(record, tasks.get_task(task))[0] == reason


def test_check_record_accepts_good_records():
    assert readers.check_record({"instruction": "x", "input": "[C]", "output": "-0.2"},
                                tasks.get_task("homolumo")) is None
    assert readers.check_record({"instruction": 3, "input": "[C]", "output": "text"},
                                tasks.get_task("molcap")) is None  # molcap ignores the instruction
