"""HF <-> omnimol checkpoint conversion: bit-exact round trips, transformers loads the export, bad input."""
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from omnimol_jax.checkpoint import CheckpointError, load_llama, read_metadata
from omnimol_jax.cli import main as cli_main
from omnimol_jax.convert import safetensors_io as st
from omnimol_jax.convert.hf_export import export_hf
from omnimol_jax.convert.hf_llama import HFConversionError, import_hf, model_config_from_hf

TINY_HF = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}


def make_hf_folder(path: Path, *, tied=True, dtype=torch.float32, max_shard_size=None, seed=0, rope=None) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY_HF, tie_word_embeddings=tied,
                                      rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # HF inits norms to 1; randomise them so a swapped norm cannot go unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    return path


def read_all(folder: Path) -> dict[str, np.ndarray]:
    return {name: st.load_tensor(info) for name, info in st.list_checkpoint_tensors(folder).items()}


@pytest.mark.parametrize("tied, dtype, shard", [(True, torch.float32, None), (False, torch.bfloat16, None),
                                                (False, torch.float32, "100KB")],
                         ids=["tied-fp32", "untied-bf16", "untied-fp32-sharded-input"])
def test_import_export_round_trip_is_bit_exact(tmp_path, tied, dtype, shard):
    hf_dir = make_hf_folder(tmp_path / "hf", tied=tied, dtype=dtype, max_shard_size=shard, rope=LLAMA3_ROPE)
    if shard:
        assert (hf_dir / st.INDEX_FILE).is_file()
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    out = export_hf(ckpt, tmp_path / "out", max_shard_size="150KB", progress=False)
    original, exported = read_all(hf_dir), read_all(out)
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert exported[name].tobytes() == tensor.tobytes(), name
    assert (out / st.INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    config_in = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    config_out = model_config_from_hf(json.loads((out / "config.json").read_text()))
    assert config_in == config_out and config_out.rope_type == "llama3"
    assert (out / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()


def test_exported_folder_loads_in_transformers_with_same_logits(tmp_path):
    hf_dir = make_hf_folder(tmp_path / "hf", tied=False, rope=LLAMA3_ROPE)
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    out = export_hf(ckpt, tmp_path / "out", progress=False)
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model = load_llama(ckpt)
    ids = np.random.default_rng(0).integers(0, TINY_HF["vocab_size"], (2, 500))
    with torch.no_grad():
        ref = reloaded.eval()(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    assert np.abs(ours - ref).max() <= 1e-4


def test_checkpoint_metadata_records_config(tmp_path):
    hf_dir = make_hf_folder(tmp_path / "hf", dtype=torch.bfloat16)
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    config, meta = read_metadata(ckpt)
    assert config.param_dtype == "bfloat16" and config.num_kv_heads == 2 and config.tie_word_embeddings
    assert meta["source"]["kind"] == "huggingface"
    assert (ckpt / "hf_assets" / "tokenizer_config.json").is_file()


def _corrupt_missing_tensor(folder: Path):
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _corrupt_wrong_shape(folder: Path):
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(**changes):
    def edit(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_missing_tensor, "missing tensors (1): model.layers.1.mlp.up_proj.weight"),
    (_corrupt_wrong_shape, "model.layers.0.self_attn.k_proj.weight: (16, 64), expected (32, 64)"),
    (_edit_config(architectures=["MistralForCausalLM"], model_type="mistral"), "unsupported architecture"),
    (_edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "unsupported rope type 'yarn'"),
    (lambda folder: (folder / "config.json").unlink(), "config.json is missing"),
    (lambda folder: (folder / "model.safetensors").write_bytes(b"\x01"), "too short to be a safetensors file"),
    (lambda folder: (folder / "model.safetensors").unlink(), "no model.safetensors or model.safetensors.index.json"),
], ids=["missing-tensor", "wrong-shape", "architecture", "rope-type", "no-config", "truncated", "no-weights"])
def test_bad_hf_folder_gives_clear_error_and_no_partial_output(tmp_path, corrupt, message):
    hf_dir = make_hf_folder(tmp_path / "hf")
    corrupt(hf_dir)
    with pytest.raises(HFConversionError) as err:
        import_hf(hf_dir, tmp_path / "out" / "ckpt", progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out" / "ckpt").exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    hf_dir = make_hf_folder(tmp_path / "hf")
    from omnimol_jax.convert import hf_llama

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_llama, "save_params", explode)
    with pytest.raises(OSError, match="disk full"):
        import_hf(hf_dir, tmp_path / "out" / "ckpt", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(tmp_path):
    hf_dir = make_hf_folder(tmp_path / "hf")
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        import_hf(hf_dir, ckpt, progress=False)
    import_hf(hf_dir, ckpt, overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match="not an omnimol checkpoint"):
        export_hf(tmp_path / "hf", tmp_path / "x", progress=False)


def test_cli_round_trip_and_errors(tmp_path, capsys):
    hf_dir = make_hf_folder(tmp_path / "hf")
    assert cli_main(["import-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    assert cli_main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                     "--dtype", "bfloat16"]) == 0
    exported = read_all(tmp_path / "out")
    assert all(t.dtype.name == "bfloat16" for t in exported.values())
    shutil.rmtree(tmp_path / "hf" / "config.json", ignore_errors=True)
    (tmp_path / "hf" / "config.json").unlink()
    assert cli_main(["import-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt2")]) == 2  # bad input
    assert "config.json is missing" in capsys.readouterr().err


def test_load_hf_weights_into_a_sharded_model_matches_the_import_path(tmp_path):
    """`init.hf` in training: weights go straight from safetensors into (sharded) parameters."""
    import jax
    from flax import nnx

    from omnimol_jax.config import MeshConfig
    from omnimol_jax.convert.hf_llama import load_hf_weights
    from omnimol_jax.model.llama import LlamaForCausalLM
    from omnimol_jax.sharding import build_mesh, create_sharded_model

    hf_dir = make_hf_folder(tmp_path / "hf", tied=False, rope=LLAMA3_ROPE)
    imported = load_llama(import_hf(hf_dir, tmp_path / "ckpt", progress=False))
    config = imported.config
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = create_sharded_model(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(9)), mesh)
    load_hf_weights(model, hf_dir, progress=False)
    q = model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, TINY_HF["vocab_size"], (2, 40)))
    from omnimol_jax.checkpoint import module_params
    loaded, reference = module_params(model), module_params(imported)
    for key in reference:  # the same numbers, bit for bit, just laid out over the mesh
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(reference[key]), err_msg=str(key))
    assert np.abs(np.asarray(model(ids).logits) - np.asarray(imported(ids).logits)).max() <= 1e-5
    # a folder of another shape is refused, naming the differences
    other = make_hf_folder(tmp_path / "other", tied=True)
    with pytest.raises(HFConversionError, match="model.tie_word_embeddings is False in the config, True there; "):
        load_hf_weights(model, other, progress=False)
