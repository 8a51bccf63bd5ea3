"""GGUF import on tiny files written here with the gguf package's own writer: a Llama that imports and matches
transformers' load of the file (llama.cpp's q/k row order undone), and the files that must be refused, each with
one line naming the file and nothing written. The real SmolLM2 file: tests/parity/test_smollm2.py."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from omnimol_jax.cli import main as cli_main
from omnimol_jax.convert.gguf_llama import GGUFError, import_gguf, open_gguf_llama
from omnimol_jax.convert.logit_check import check_against_hf


def write_llama(path, arch="llama", up_type=None, drop=None):
    """A 1-layer Llama (hidden 32, 2 query / 1 KV heads, vocab 32) without tokenizer metadata."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(32)
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (32, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
               "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32),
               "blk.0.attn_v.weight": (16, 32), "blk.0.attn_output.weight": (32, 32),
               "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64), "blk.0.ffn_up.weight": (64, 32)}
    for name, shape in tensors.items():
        if name == drop:
            continue
        if name == "blk.0.ffn_up.weight" and up_type is not None:  # raw blocks of a type gguf cannot dequantize
            writer.add_tensor(name, np.zeros((64, 40), np.uint8), raw_dtype=up_type)
            continue
        scale = 1.0 if len(shape) == 1 else 0.2
        writer.add_tensor(name, (scale * rng.standard_normal(shape) + (len(shape) == 1)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_llama_imports_with_transformers_logits(tmp_path, caplog):
    path = write_llama(tmp_path / "tiny.gguf")
    out = import_gguf(path, tmp_path / "ckpt", progress=False)
    assert "no tokenizer imported" in caplog.text and not (out / "hf_assets").exists()  # none in the file
    for report in check_against_hf(out, gguf=path, seq_lens=(8, 40)):
        assert report.top1_agreement == 1.0 and report.ok(1e-5), report  # q/k rows wrong: O(1) differences


@pytest.mark.parametrize("case, message", [
    ("gpt2", "a 'gpt2' model, not a Llama"),
    ("q8_1", "tensor blk.0.ffn_up.weight is stored as Q8_1, which the installed gguf cannot dequantize"),
    ("missing", r"missing tensors \(1\): model.layers.0.mlp.down_proj.weight"),
])
def test_files_that_cannot_import_are_refused_with_one_line(tmp_path, capsys, case, message):
    path = {"gpt2": lambda p: write_llama(p, arch="gpt2"),
            "q8_1": lambda p: write_llama(p, up_type=GGMLQuantizationType.Q8_1),
            "missing": lambda p: write_llama(p, drop="blk.0.ffn_down.weight")}[case](tmp_path / f"{case}.gguf")
    with pytest.raises(GGUFError, match=message):
        open_gguf_llama(path)
    assert cli_main(["import-hf", "--gguf", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and not (tmp_path / "out").exists()
