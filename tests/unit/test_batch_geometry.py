"""data.global_batch_size: one meaning on every topology; the old per-process key is refused with what to write."""
from pathlib import Path

import pytest

from omnimol_jax.config import BASE_CONFIG, BatchGeometry, ConfigError, batch_geometry, load_config
from omnimol_jax.train.config_contract import compare_configs, upgrade_stored_config

SHIPPED_1B = Path(__file__).resolve().parents[2] / "configs" / "omnimol_1b.yaml"


def test_the_shipped_recipe_means_the_same_global_batch_on_any_pod():
    config = load_config(SHIPPED_1B)
    # v5p-16: 2 hosts x 4 chips; v5p-32: 4 hosts x 4 chips; the mesh puts every chip on the batch axis
    v5p16, v5p32 = batch_geometry(config, 2, 8), batch_geometry(config, 4, 16)
    assert v5p16.global_rows == v5p32.global_rows == 128
    assert (v5p16.process_rows, v5p16.device_rows) == (64, 16)
    assert (v5p32.process_rows, v5p32.device_rows) == (32, 8)
    assert v5p16.tokens_per_step == v5p32.tokens_per_step == 128 * 2048


def test_micro_batches_split_the_global_batch():
    geometry = BatchGeometry(global_rows=64, grad_accum_steps=4, processes=2, batch_shards=8, seq_len=512)
    assert (geometry.micro_batch_rows, geometry.process_rows, geometry.device_rows) == (16, 8, 2)
    assert geometry.tokens_per_step == 64 * 512
    assert "global batch 64 rows x 512 tokens = 32,768 tokens" in geometry.describe()
    assert geometry.to_dict()["process_rows"] == 8


@pytest.mark.parametrize("global_rows, accum, processes, message", [
    (10, 4, 1, "data.global_batch_size: 10 rows do not divide into train.grad_accum_steps=4 micro-batches"),
    (12, 2, 4, "data.global_batch_size: a micro-batch of 6 rows (global 12 / 2 accumulation steps) does not "
               "divide over 4 processes"),
])
def test_a_global_batch_that_does_not_divide_names_the_key(global_rows, accum, processes, message):
    with pytest.raises(ConfigError) as err:
        BatchGeometry(global_rows, accum, processes, 1, 128)
    assert str(err.value) == message


def test_a_config_whose_batch_does_not_divide_into_micro_batches_is_refused_at_load():
    with pytest.raises(ConfigError, match="data.global_batch_size: 6 rows do not divide into "
                                          "train.grad_accum_steps=4"):
        load_config(BASE_CONFIG, ["data.global_batch_size=6", "train.grad_accum_steps=4"])


def test_the_old_per_process_key_says_what_to_write_instead(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  batch_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith("data.batch_size: no longer a key: it counted rows per process; write "
                                     "data.global_batch_size")


def test_a_run_stored_with_the_old_key_resumes_under_the_global_batch_it_meant():
    stored = {"data": {"batch_size": 4, "seq_len": 256}, "train": {"grad_accum_steps": 2}}
    upgraded = upgrade_stored_config(stored, processes=2)
    assert upgraded["data"] == {"global_batch_size": 16, "seq_len": 256} and stored["data"]["batch_size"] == 4
    current = {"data": {"global_batch_size": 16, "seq_len": 256}, "train": {"grad_accum_steps": 2}}
    assert not compare_configs(upgraded, current)
    other = {"data": {"global_batch_size": 8, "seq_len": 256}, "train": {"grad_accum_steps": 2}}
    assert compare_configs(upgraded, other).refused == {"data.global_batch_size": (16, 8)}
    assert upgrade_stored_config(current, processes=2) is current
