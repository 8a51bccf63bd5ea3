"""`omnimol inspect-data`: the samples a run trains on, as text with the supervised span and as ids/labels."""
import json

import numpy as np
import pytest
import yaml

from omnimol_jax import corpus
from omnimol_jax.cli import main as cli_main
from omnimol_jax.config import load_config
from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from omnimol_jax.data.pipeline import Pipeline
from omnimol_jax.train.inspect_data import run_tokenizer
from omnimol_jax.train.recipes import run_unfreeze


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    corpus.build_corpus(tmp / "data", corpus.CorpusConfig(seed=0, size=20, tokenizer_vocab_size=800,
                                                          tasks=("weight", "iupac")))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny", "vocab_size": 1024},
                                    "data": {"data_dir": str(tmp / "data"), "tasks": "weight/iupac"}}))
    return path


def test_records_as_text_with_the_supervised_span_and_graph_slots(config_path, capsys):
    assert cli_main(["inspect-data", "--config", str(config_path), "--task", "weight", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== weight:") == 2 and "=== iupac" not in out
    assert "chat format llama3-omnimol, end of turn '<|eot_id|>'" in out
    assert "<|start_header_id|>user<|end_header_id|>\n\n<graph: " in out
    assert "«The molecular weight of this molecule is " in out and "<|eot_id|>»" in out


def test_json_lines_are_the_pipelines_samples(config_path, capsys):
    assert cli_main(["inspect-data", "--config", str(config_path), "-n", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["task"] for r in rows] == ["weight", "iupac"]
    config = load_config(config_path)
    pipeline = Pipeline(config.data, run_tokenizer(config), feature_mode=config.graph.feature_mode)
    for task_index, row in enumerate(rows):
        sample = pipeline.builder.build(task_index, 0)
        assert row["input_ids"] == sample["input_ids"].tolist() and row["labels"] == sample["labels"].tolist()
        ids, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
        assert row["num_atoms"] == int((ids == IMAGE_TOKEN_ID).sum()) == len(sample["node_features"])
        assert row["supervised"] == int((labels != IGNORE_INDEX).sum()) > 0
    assert rows[1]["num_atoms"] == 0  # iupac is text only


def test_bad_requests_are_one_line_errors(config_path, capsys):
    assert cli_main(["inspect-data", "--config", str(config_path), "--task", "forward"]) == 2
    assert "not in this config's data.tasks" in capsys.readouterr().err
    assert cli_main(["inspect-data", "--config", str(config_path), "-n", "0"]) == 2


def test_the_graph_tower_trains_while_it_starts_random(config_path, tmp_path):
    assert run_unfreeze(load_config(config_path)) == ()  # "stage": frozen, as the paper's MoleculeSTM tower
    auto = load_config(config_path, ["train.graph_tower=auto"])
    assert run_unfreeze(auto) == ("^graph_tower/",)
    for pretrained in ("init.moleculestm=/x/molecule_model.pth", "init.projector=/x/stage1/final"):
        assert run_unfreeze(load_config(config_path, ["train.graph_tower=auto", pretrained])) == ()
    assert run_unfreeze(load_config(config_path, ["train.graph_tower=always", "init.moleculestm=/x/m.pth",
                                                  "train.unfreeze=[projector]"])) == ("projector", "^graph_tower/")
