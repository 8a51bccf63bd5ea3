"""Conversion memory: the model plus a few tensors in flight, never the whole model twice over.

Counted in bytes that numpy allocates on the host (tracemalloc sees every numpy buffer), which is deterministic,
instead of RSS, which depends on the allocator and what else runs. An import holds the model as device arrays and
streams tensors through numpy; an export reads the stored model onto the host once and writes it tensor by tensor.
A second host copy of the model (what a plain Orbax save of numpy trees makes) would add a whole model to either.
`benchmarks/convert_memory.py` measures the RSS of the same conversions (docs/results.md)."""
import importlib.util
import tracemalloc
from pathlib import Path

from omnimol_jax.convert.hf_export import export_hf
from omnimol_jax.convert.hf_llama import import_hf

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("convert_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _host_peak(convert, *args) -> int:
    tracemalloc.start()
    try:
        convert(*map(str, args), progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_import_and_export_hold_one_model_plus_a_few_tensors(tmp_path):
    # 75 tensors, the largest 1/8 of the model: holding "one tensor" extra is cheap, a second model is not.
    sizes = _bench().write_random_hf(tmp_path / "hf", hidden=512, layers=8, vocab=8000, ffn=1408, heads=8,
                                     kv_heads=4)
    model, largest = sizes["model_bytes"], sizes["largest_tensor_bytes"]
    assert largest * 7 < model
    imported = _host_peak(import_hf, tmp_path / "hf", tmp_path / "ckpt")
    exported = _host_peak(export_hf, tmp_path / "ckpt", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    # measured: import 2.2 largest tensors (the model itself lives in device arrays), export the model + 0.06
    assert imported < 3 * largest, (imported, largest)
    assert exported < model + 2 * largest, (exported, model, largest)
