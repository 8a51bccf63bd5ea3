"""omnimol compile: topology names, the AOT-compiled train step and generation program, and their reports."""
import json

import pytest

from omnimol_jax.aot import topology as T
from omnimol_jax.aot.programs import compile_run, report_table
from omnimol_jax.cli import main as cli_main
from omnimol_jax.config import load_config


@pytest.mark.parametrize("name, expected", [
    ("v5p-16", ("v5p", "2x2x2")), ("v5p-8", ("v5p", "2x2x1")), ("v4-32", ("v4", "2x2x4")),
    ("v5e-16", ("v5e", "4x4")), ("v5e-256", ("v5e", "16x16")), ("v6e-64", ("v6e", "8x8")),
    ("v5litepod-4", ("v5e", "2x2")), ("v5e:4x8", ("v5e", "4x8")), ("v5p:2x2x4", ("v5p", "2x2x4")),
])
def test_slice_names_map_to_torus_shapes(name, expected):
    assert T.tpu_topology_string(name) == expected


@pytest.mark.parametrize("name, message", [
    ("v5p-15", r"v5p slices come in sizes \[8, 16, 32"), ("v7-8", "unknown topology 'v7-8'"),
    ("cpu:x", "cpu:N takes a device count"), ("cpu:64", "this process has 8 CPU device"),
])
def test_bad_topologies_say_what_would_work(name, message):
    with pytest.raises(T.TopologyError, match=message):
        T.resolve(name) if name.startswith("cpu") else T.tpu_topology_string(name)


def _tiny(*overrides):
    return load_config(None, ["model.preset=tiny", "model.lora.enabled=true", "model.moge.enabled=true",
                              "model.moge.layers=all",
                              "data.seq_len=128", "data.global_batch_size=8", "train.grad_accum_steps=2", *overrides])


def test_the_train_step_and_generation_compile_for_cpu_devices_with_real_reports():
    target = T.resolve("cpu:4")
    reports = compile_run(_tiny(), target, ("train", "generate"), prompt_len=64, new_tokens=8)
    train, generate = reports
    assert train.name == "train_step" and generate.name == "generate"
    for report in reports:
        assert report.flops > 0 and report.bytes_accessed > 0 and report.argument_bytes > 0 and report.fits
        assert report.total_bytes == (report.argument_bytes + report.output_bytes - report.alias_bytes
                                      + report.temp_bytes + report.code_bytes)
        assert report.step_time_bound_s > 0 and 0 < report.mfu_bound <= 1
        assert report.largest_temporaries and "MiB" in report.largest_temporaries[0]
    # the state is donated: its outputs alias its inputs
    assert train.alias_bytes > 0
    assert train.flops > generate.flops / 8  # a train step of 4 x 2 x 128 tokens outweighs 8 decode steps
    text = report_table(target, reports)
    assert "train_step: FITS" in text and "generate: FITS" in text and "MFU bound" in text


def test_the_cli_writes_json_and_exits_1_when_a_program_does_not_fit(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert cli_main(["compile", "--topology", "cpu:2", "--programs", "train", "--out", str(out),
                     "model.preset=tiny", "data.seq_len=64", "data.global_batch_size=2"]) == 0
    report = json.loads(out.read_text())
    assert report["devices"] == 2 and report["programs"][0]["fits"] is True
    assert cli_main(["compile", "--topology", "cpu:2", "--programs", "train", "--hbm-gib", "0.001",
                     "model.preset=tiny", "data.seq_len=64", "data.global_batch_size=2"]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "train_step does not fit cpu:2" in captured.err
    assert cli_main(["compile", "--topology", "v9-8", "model.preset=tiny"]) == 2


def test_a_tpu_slice_compiles_when_libtpu_is_installed():
    pytest.importorskip("libtpu", reason="the tpu extra is not installed (pip install '.[tpu]', make test-tpu)")
    target = T.resolve("v5e:2x2")
    assert len(target.devices) == 4 and target.hbm_bytes == 16 * 2 ** 30
    reports = compile_run(_tiny(), target, ("train",))
    assert reports[0].fits and reports[0].flops > 0 and reports[0].code_bytes > 0


@pytest.mark.slow  # test_scan_layers counts every layer and loss chunk at one micro batch
def test_the_reported_flops_count_every_micro_batch_and_loss_chunk():
    """XLA counts a loop body once; the report counts the accumulation loop and the loss chunks in full: two
    micro-batches cost twice one (the optimizer update aside), and chunking the loss changes nothing."""
    target = T.resolve("cpu:4")

    def train_flops(*overrides):  # no MoGE and short rows: three compiles in seconds
        return compile_run(_tiny("model.moge.enabled=false", "data.seq_len=64", *overrides), target,
                           ("train",))[0].flops

    one = train_flops("train.grad_accum_steps=1", "train.loss_chunk=0")
    two = train_flops("train.grad_accum_steps=2", "train.loss_chunk=0")
    two_chunked = train_flops("train.grad_accum_steps=2", "train.loss_chunk=32")
    assert 1.9 < two / one < 2.02
    assert two_chunked == pytest.approx(two, rel=0.03)
