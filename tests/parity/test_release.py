"""import-release / export-release of the public code's checkpoint layout (docs/omnimol.md §7).

Tiny release folders are written with torch by tests/release_reference_torch.py (built from docs/omnimol.md, not
from our converter): fp32 and bf16, nonzero LoRA B, GAL scalars off-centre inside their boxes, 5 experts, top-2 and a
shared expert. The imported model's logits must equal the torch model of the release within 1e-4 (fp32) on prompts
that carry graphs, and export-release must give back the same files, keys and values.
"""
import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from release_reference_torch import ReleasedOmniMol, load_release, release_configs, tiny_llama, trained, write_release
from safetensors.torch import load_file, save_file

from omnimol_jax.checkpoint import (
    load_omnimol,
    module_state,
    read_metadata,
    save_model_checkpoint,
    save_omnimol_checkpoint,
)
from omnimol_jax.cli import main as cli_main
from omnimol_jax.config import GraphConfig, load_config, model_config_from_preset
from omnimol_jax.constants import IMAGE_TOKEN_ID
from omnimol_jax.convert.release import export_release, import_release
from omnimol_jax.convert.release_layout import ReleaseFormatError, adapter_overrides
from omnimol_jax.data.featurize import selfies_to_graph
from omnimol_jax.inference.decoding import build_prompt_batch
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.model.lora import LoRA, RouterWeight

MOLECULES = ["[C][C][=C][C][=C][C][=C][Ring1][=Branch1][O]", "[N][C][C][=Branch1][C][=O][O]", None]


def make_release(tmp_path, *, moe=None, dtype=torch.float32, seed=0, stage1=False, alpha=16.0, name="release",
                 **adapter_kw):
    """(release folder, base folder, molecule_model.pth) of a trained tiny model."""
    llama = tiny_llama(seed)
    release, adapter = release_configs(llama, moe=moe, alpha=alpha, **adapter_kw)
    model = trained(ReleasedOmniMol(llama, release, None if stage1 else adapter), seed)
    folder, base, graph = tmp_path / name, tmp_path / f"{name}_base", tmp_path / f"{name}_molecule_model.pth"
    write_release(model, release, adapter, folder, base, graph, dtype=dtype, stage1=stage1)
    return folder, base, graph


def _batch(lengths):
    """A left-padded batch: two rows with molecules (graph slots after 3 tokens) and one text-only row."""
    rng = np.random.default_rng(0)
    graphs = [selfies_to_graph(m) if m else None for m in MOLECULES]
    prompts = []
    for graph, tail in zip(graphs, lengths):
        slots = [IMAGE_TOKEN_ID] * graph.num_nodes if graph else []
        prompts.append(list(rng.integers(1, 384, 3)) + slots + list(rng.integers(1, 384, tail)))
    return build_prompt_batch(prompts, graphs, pad_token_id=0), graphs


def assert_same_logits(checkpoint, reference, lengths_list=((4, 9, 2), (480, 300, 500))):
    model, _ = load_omnimol(checkpoint)
    worst = 0.0
    for lengths in lengths_list:
        batch, graphs = _batch(lengths)
        ours = np.asarray(model(jnp.asarray(batch.input_ids), batch.graphs,
                                attention_mask=jnp.asarray(batch.attention_mask)).logits)
        theirs = reference(batch.input_ids, batch.attention_mask, graphs)
        real = batch.attention_mask.astype(bool)
        worst = max(worst, float(np.abs(ours - theirs)[real].max()))
        assert np.abs(theirs[real]).max() > 0.1  # not vacuous
    assert worst <= 1e-4, worst
    return worst


def _tensors(folder):
    out = {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    out.update(torch.load(folder / "non_lora_trainables.bin", weights_only=True))
    return out


@pytest.mark.parametrize("dtype, moe", [
    (torch.float32, {"moe_mode": "second_half", "num_experts": [5, 5]}),
    (torch.bfloat16, {"moe_mode": "sparse", "moe_layers_idx": [0, 2], "num_experts": [5, 5]}),
])
def test_import_matches_the_released_model_and_export_gives_back_the_same_files(tmp_path, dtype, moe):
    folder, base, graph = make_release(tmp_path, moe=moe, dtype=dtype)
    ours = import_release(folder, tmp_path / "ours", moleculestm=str(graph), dtype="float32", progress=False)
    config, meta = read_metadata(ours)
    assert config.moge.enabled and config.moge.num_experts == 5 and config.moge.top_k == 2
    assert config.moge.num_shared_experts == 1 and not config.moge.norm_topk_prob
    assert list(config.moge.layer_indices(4)) == (moe.get("moe_layers_idx") or [2, 3])
    assert meta["source"]["release_dtype"] == ("bfloat16" if dtype == torch.bfloat16 else "float32")
    # The overrides import-release prints give a run config this model's adapters, routers and experts.
    run = load_config(None, ["model.preset=tiny", "model.num_layers=4"] + adapter_overrides(config)).model
    assert run.lora == config.lora and run.moge == config.moge
    # The reference reads the files (bf16 values exactly, computed in fp32).
    assert_same_logits(ours, load_release(folder, graph))

    back = export_release(ours, tmp_path / "back", base=str(base), progress=False)
    assert {p.name for p in back.iterdir()} >= {"config.json", "adapter_config.json", "adapter_model.safetensors",
                                                 "non_lora_trainables.bin", "molecule_model.pth"}
    for name in ("config.json", "adapter_config.json"):
        assert json.loads((back / name).read_text()) == json.loads((folder / name).read_text()), name
    original, exported = _tensors(folder), _tensors(back)
    assert set(original) == set(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        assert torch.equal(exported[key], value), key
    # What export-release writes loads in the public order and computes the same model.
    assert_same_logits(ours, load_release(back, back / "molecule_model.pth"), lengths_list=((4, 9, 2),))


def test_a_lora_only_release_and_an_export_that_writes_its_own_base(tmp_path):
    folder, base, graph = make_release(tmp_path, moe=None, targets=("q_proj", "v_proj", "down_proj"), alpha=8.0)
    # the older PEFT file format: adapter_model.bin (torch.save), read with weights_only=True
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    ours = import_release(folder, tmp_path / "ours", moleculestm=str(graph), progress=False)
    config, _ = read_metadata(ours)
    assert config.lora.targets == ("q_proj", "v_proj", "down_proj") and not config.moge.enabled
    assert_same_logits(ours, load_release(folder, graph), lengths_list=((4, 9, 2),))
    moved = tmp_path / "moved_base"
    shutil.move(base, moved)  # the recorded base is gone: export writes the frozen weights beside the release
    back = export_release(ours, tmp_path / "back", progress=False)
    text = json.loads((back / "config.json").read_text())["text_config"]
    assert text["_name_or_path"] == str((back / "base").resolve())
    assert json.loads((back / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (back / "base").resolve())
    assert_same_logits(ours, load_release(back, back / "molecule_model.pth"), lengths_list=((4, 9, 2),))


def test_a_stage1_projector_checkpoint(tmp_path):
    folder, base, graph = make_release(tmp_path, stage1=True)
    ours = import_release(folder, tmp_path / "ours", moleculestm=str(graph), progress=False)
    config, _ = read_metadata(ours)
    assert not config.lora.enabled and not config.moge.enabled
    assert_same_logits(ours, load_release(folder, graph), lengths_list=((4, 9, 2),))


def test_a_model_trained_here_exports_to_a_release_the_reference_loads(tmp_path):

    config = model_config_from_preset(
        "tiny", vocab_size=384, num_layers=4, max_position_embeddings=1024,
        lora=dict(enabled=True, rank=4, dropout=0.0),
        moge=dict(enabled=True, layer_list=(1, 3), num_experts=3, top_k=2))
    graph = GraphConfig(num_layers=2, hidden_size=32)
    model = omnimol_constructor(config, graph, seed=1)()
    rng = np.random.default_rng(1)
    for _, owner in nnx.iter_modules(model):
        if isinstance(owner, LoRA):
            owner.b.set_value(jnp.asarray(rng.normal(0, 0.05, owner.b.shape), jnp.float32))
            owner.gal_p.set_value(jnp.asarray(rng.uniform(0.49, 0.51, owner.gal_p.shape), jnp.float32))
    for _, variable in nnx.to_flat_state(nnx.state(model, RouterWeight)):
        variable.set_value(jnp.asarray(rng.normal(0, 0.5, variable.get_value().shape), jnp.float32))
    checkpoint = save_omnimol_checkpoint(tmp_path / "ckpt", config, graph, model)
    out = export_release(checkpoint, tmp_path / "release", progress=False)
    release = json.loads((out / "config.json").read_text())
    assert release["moe_config"]["moe_layers_idx"] == [1, 3] and release["moe_config"]["num_experts"] == [3, 3]
    assert_same_logits(checkpoint, load_release(out, out / "molecule_model.pth"), lengths_list=((4, 9, 2),))
    # and it imports back to the same parameters
    again = import_release(out, tmp_path / "again", moleculestm=str(out / "molecule_model.pth"), progress=False)
    assert_same_logits(again, load_release(out, out / "molecule_model.pth"), lengths_list=((4, 9, 2),))


# --------------------------------------------------------------------------------------------------
# Bad input: one error naming the problem, nothing written


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path.write_text(json.dumps(data))


def _drop_adapter(folder):
    (folder / "adapter_model.safetensors").unlink()


def _wrong_shape(folder):
    state = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in state if "layers.1.self_attn.q_proj.lora_B" in k)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    state["base_model.model.language_model.model.layers.0.mlp.extra.lora_A.weight"] = torch.zeros(4, 64)
    del state[next(k for k in state if "layers.0.self_attn.k_proj.lora_A" in k)]
    save_file(state, folder / "adapter_model.safetensors")


class NotATensor:
    """Unpickling this needs arbitrary code; weights_only loading must refuse it."""


def _unsafe_bin(folder):
    torch.save({"base_model.model.mm_projector.weight.weight": NotATensor()}, folder / "non_lora_trainables.bin")


BAD = [
    (_drop_adapter, "adapter_config.json is there but no adapter weights"),
    (_wrong_shape, r"the weights do not match config.json and adapter_config.json: missing \(1\): "
                   r".*layers.0.self_attn.k_proj.lora_A.weight \| wrong shapes \(1\): .*layers.1.self_attn.q_proj."
                   r"lora_B.weight: \[65, 4\], expected \[64, 4\] \| unexpected \(1\): .*layers.0.mlp.extra"),
    (lambda f: _edit_json(f / "config.json", moe_config__moe_mode="every_other"),
     "moe_config.moe_mode 'every_other' is not a mode of the public code"),
    (lambda f: _edit_json(f / "adapter_config.json", r=8), r"LoRA rank 4 \(.*lora_A.weight\) disagrees with r=8"),
    (_unsafe_bin, "non_lora_trainables.bin: cannot be read as a weights-only torch file"),
    (lambda f: _edit_json(f / "config.json", moe_config__num_experts=[5, 4]), r"num_experts \[5, 4\] differs"),
]


@pytest.mark.parametrize("corrupt, message", BAD, ids=["no-adapter", "keys", "moe-mode", "rank", "unsafe", "experts"])
def test_bad_release_folders_fail_with_one_error_and_write_nothing(tmp_path, corrupt, message):
    folder, _, graph = make_release(tmp_path, moe={"moe_mode": "second_half", "num_experts": [5, 5]})
    corrupt(folder)
    with pytest.raises(ReleaseFormatError, match=message):
        import_release(folder, tmp_path / "out", moleculestm=str(graph), progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_the_cli_imports_and_refuses_with_exit_2(tmp_path, capsys):
    folder, base, graph = make_release(tmp_path, moe={"moe_mode": "second_half", "num_experts": [5, 5]})
    assert cli_main(["import-release", "--checkpoint", str(folder), "--out", str(tmp_path / "a")]) == 2
    assert "never holds the graph tower; pass --moleculestm" in capsys.readouterr().err
    assert cli_main(["import-release", "--checkpoint", str(folder), "--moleculestm", str(graph), "--base", str(base),
                     "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert f"init.checkpoint={tmp_path / 'a'} model.lora.enabled=true model.lora.rank=4" in capsys.readouterr().out
    assert cli_main(["export-release", "--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                     "--base", str(tmp_path), "--no-progress"]) == 2
    assert "config.json" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_exports_the_release_cannot_carry_are_refused(tmp_path):
    from omnimol_jax.model.llama import LlamaForCausalLM

    base = model_config_from_preset("tiny", vocab_size=384, num_layers=4, lora=dict(enabled=True, rank=4),
                                    moge=dict(enabled=True, expert_ranks=(4, 2, 4, 4, 4)))
    graph = GraphConfig(num_layers=2, hidden_size=32)
    ranks = save_omnimol_checkpoint(tmp_path / "ranks", base, graph, omnimol_constructor(base, graph)())
    with pytest.raises(ReleaseFormatError, match=r"cannot carry this model: per-expert ranks \[4, 2, 4, 4, 4\]"):
        export_release(ranks, tmp_path / "x", progress=False)
    mlp = GraphConfig(num_layers=2, hidden_size=32, projector_type="mlp2x_silu")
    plain = dataclasses.replace(base, moge=dataclasses.replace(base.moge, expert_ranks=None))
    projector = save_omnimol_checkpoint(tmp_path / "mlp", plain, mlp, omnimol_constructor(plain, mlp)())
    with pytest.raises(ReleaseFormatError, match="graph.projector_type=mlp2x_silu"):
        export_release(projector, tmp_path / "y", progress=False)
    lm = save_model_checkpoint(tmp_path / "lm", plain, module_state(LlamaForCausalLM(plain, rngs=__import__(
        "flax").nnx.Rngs(0))))
    with pytest.raises(ReleaseFormatError, match="language model only"):
        export_release(lm, tmp_path / "z", progress=False)
    assert not any((tmp_path / n).exists() for n in "xyz")
