"""Report writers (JSON, Markdown, PNG) and the resumable predictions JSONL."""
import json
import math

import pytest

from omnimol_jax.eval.metrics import compute_metrics_from_records
from omnimol_jax.eval.report import PredictionStore, markdown_table, read_predictions, write_report

RESULTS = {
    "forward": {
        "reference": {"validity": 0.75, "exact_match": 2 / 3, "bleu": 0.5, "levenshtein": 1.0, "maccs_fts": 0.9,
                      "rdk_fts": 0.8, "morgan_fts": 0.7, "n": 4, "n_valid": 3, "n_failed": 1},
        "strict": {"validity": 0.5, "exact_match": 0.25, "bleu": 0.4, "levenshtein": 1.75, "maccs_fts": 0.5,
                   "rdk_fts": 0.5, "morgan_fts": 0.5, "n": 4, "n_valid": 2, "n_failed": 2},
    },
    "yield": {
        "reference": {"r2_BH": 0.5, "r2_SM": float("nan"), "r2": float("nan"), "n": 5, "n_valid": 4, "n_failed": 1},
        "strict": {"r2_BH": 0.375, "r2_SM": 0.75, "r2": 0.5625, "n": 5, "n_valid": 4, "n_failed": 1},
    },
    "logp": {"reference": {"mae": 0.0, "n": 4, "n_valid": 3, "n_failed": 1},
             "strict": {"mae": 1.94, "n": 4, "n_valid": 3, "n_failed": 1}},
}


def test_markdown_table_rows():
    table = markdown_table(RESULTS)
    lines = table.splitlines()
    assert "| task | n | n_failed | validity | exact_match | bleu | levenshtein | maccs_fts | rdk_fts | morgan_fts |" \
        in lines
    assert ("| forward | 4 | 1 / 2 | 0.7500 / 0.5000 | 0.6667 / 0.2500 | 0.5000 / 0.4000 | 1.0000 / 1.7500 | "
            "0.9000 / 0.5000 | 0.8000 / 0.5000 | 0.7000 / 0.5000 |") in lines
    assert "| task | n | n_failed | r2 | r2_BH | r2_SM |" in lines
    assert "| yield | 5 | 1 / 1 | - / 0.5625 | 0.5000 / 0.3750 | - / 0.7500 |" in lines
    assert "| logp | 4 | 1 / 1 | 0.0000 / 1.9400 |" in lines


def test_write_report_files(tmp_path):
    paths = write_report(RESULTS, tmp_path)
    payload = json.loads((tmp_path / "metrics" / "yield.json").read_text())
    assert payload["metric_set"] == "yield_r2"
    assert payload["protocols"]["reference"]["r2_SM"] is None  # NaN -> null
    assert payload["protocols"]["strict"]["r2"] == 0.5625
    assert (tmp_path / "metrics.md").read_text().startswith("# Evaluation results")
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["forward.json", "logp.json", "yield.json"]


def test_prediction_store_resumes_after_a_crash(tmp_path):
    path = tmp_path / "predictions.jsonl"
    store = PredictionStore(path)
    ids = [f"logp/{i}" for i in range(4)]
    assert store.missing(ids) == ids
    first = [{"id": ids[0], "task": "logp", "prediction": "LogP -1.5", "reference": "1.5"},
             {"id": ids[1], "task": "logp", "prediction": "2", "reference": "2.5"}]
    assert store.append(first) == 2
    assert store.append(first[:1]) == 0  # already there: skipped
    with path.open("a") as handle:  # a crash in the middle of a write
        handle.write('{"id": "logp/2", "task": "logp", "predi')
    resumed = PredictionStore(path)
    assert len(resumed) == 2 and resumed.missing(ids) == ids[2:]
    assert path.read_text().endswith("}\n")  # the partial line was trimmed
    resumed.append([{"id": i, "task": "logp", "prediction": "1", "reference": "1"} for i in ids[2:]])
    records = read_predictions(path)
    assert list(records) == ids
    assert all(json.loads(line) for line in path.read_text().splitlines())
    metrics = compute_metrics_from_records("logp", resumed.for_task("logp", order=ids))
    # reference: |1.5-1.5|, |2-2.5|, 0, 0
    assert metrics["reference"]["mae"] == pytest.approx(0.125)
    assert metrics["strict"]["mae"] == pytest.approx((3.0 + 0.5) / 4)


def test_prediction_store_keeps_a_whole_last_line_without_newline_and_rejects_corruption(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "prediction": "y"}')
    assert list(PredictionStore(path).records) == ["a", "b"]
    assert path.read_text().endswith("\n")
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not a JSON record"):
        PredictionStore(path)
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: record id 'a' appears twice"):
        PredictionStore(path)
    with pytest.raises(ValueError, match="without 'id'"):
        PredictionStore(tmp_path / "new.jsonl").append([{"prediction": "x"}])
    with pytest.raises(KeyError, match="no prediction yet"):
        PredictionStore(tmp_path / "new.jsonl").for_task("logp", order=["z"])


def test_records_with_groups_and_instructions(tmp_path):
    records = [{"id": "h0", "prediction": "-0.25", "reference": -0.2, "instruction": "HOMO energy?"},
               {"id": "h1", "prediction": "0.1", "reference": 0.2, "instruction": "LUMO energy?"}]
    metrics = compute_metrics_from_records("homolumo", records, protocols=("strict",))
    assert metrics["strict"]["mae_homo"] == pytest.approx(0.05) and metrics["strict"]["mae_lumo"] == pytest.approx(0.1)
    assert math.isnan(metrics["strict"]["mae_gap"])
    with pytest.raises(KeyError, match="'h9' has no 'reference'"):
        compute_metrics_from_records("logp", [{"id": "h9", "prediction": "1"}])


def test_stopped_share_counts_answers_that_stop_within_twice_the_reference():
    from omnimol_jax.eval.runner import stopped_share

    def pieces(text):  # SELFIES symbols, as the tokenizer's added tokens split them
        return [p + "]" for p in text.split("]") if p]

    ref = "[C][C][O]"  # 3 tokens: an answer may take up to 2 * 3 + 1 = 7 tokens with its stop token
    records = [{"reference": ref, "finished": True, "num_tokens": 4},    # stops in time
               {"reference": ref, "finished": True, "num_tokens": 7},    # just in time
               {"reference": ref, "finished": True, "num_tokens": 8},    # stops too late
               {"reference": ref, "finished": False, "num_tokens": 5}]   # never stopped (cut off)
    assert stopped_share(records, pieces) == {"stopped_2x": 0.5}
    assert stopped_share([{"reference": ref, "prediction": ref}], pieces) == {}  # baselines: no lengths
