"""export-hf of trained models: LoRA merged into a stock LlamaForCausalLM, LoRA as a PEFT adapter loaded by stock
`PeftModel.from_pretrained`, MoGE as a stock Qwen2MoeForCausalLM (no custom code), the graph side of a full model,
and refusals that never drop a weight. Logits against the JAX model within 1e-4 (fp32), on short and ~500-token
prompts in a padded batch."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from omnimol_jax.checkpoint import load_llama, module_state, save_model_checkpoint, save_omnimol_checkpoint
from omnimol_jax.cli import main as cli_main
from omnimol_jax.config import GraphConfig, model_config_from_preset
from omnimol_jax.convert import safetensors_io as st
from omnimol_jax.convert.hf_export import export_hf
from omnimol_jax.convert.hf_llama import HFConversionError
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.model.llama import LlamaForCausalLM
from omnimol_jax.model.lora import LoRA, RouterWeight

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, rope_factor=32.0, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0, rope_original_max_position_embeddings=128)


def _config(moge: bool, *, tied=True, shared=1, norm_topk=False, expert_ranks=None, layer_list=()):
    lora = dict(enabled=True, rank=4, dropout=0.0)
    moge_config = dict(enabled=moge, layers="second_half", num_experts=5, top_k=2, num_shared_experts=shared,
                       norm_topk_prob=norm_topk, expert_ranks=expert_ranks, layer_list=layer_list)
    return model_config_from_preset("tiny", vocab_size=384, num_layers=4, max_position_embeddings=1024,
                                    tie_word_embeddings=tied, lora=lora, moge=moge_config, **LLAMA3_ROPE)


def _trained(module, seed=0):
    """Nonzero B, GAL scalars off-centre but inside their boxes, distinct routers: as after training."""
    rng = np.random.default_rng(seed)
    for _, owner in nnx.iter_modules(module):
        if isinstance(owner, LoRA):
            owner.b.set_value(jnp.asarray(rng.normal(0, 0.05, owner.b.shape), owner.b.get_value().dtype))
            if owner.config.gal:
                for name, low, high in (("gal_a", 15.9, 16.1), ("gal_b", -0.05, 0.05), ("gal_p", 0.49, 0.51)):
                    variable = getattr(owner, name)
                    variable.set_value(jnp.asarray(rng.uniform(low, high, variable.shape), jnp.float32))
    for path, variable in nnx.to_flat_state(nnx.state(module, RouterWeight)):
        variable.set_value(jnp.asarray(rng.normal(0, 0.5, variable.get_value().shape), jnp.float32))
    return module


def _lm_checkpoint(tmp_path, config, name="ckpt", seed=0):
    model = _trained(LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), seed)
    return save_model_checkpoint(tmp_path / name, config, module_state(model)), model


def _prompts(vocab, lengths=(7, 500), seed=0):
    """(ids, mask) batches: each length in a padded batch (the second row left-padded by a third)."""
    rng = np.random.default_rng(seed)
    for length in lengths:
        ids = rng.integers(0, vocab, (2, length)).astype(np.int64)
        mask = np.ones((2, length), np.int64)
        mask[1, : length // 3] = 0
        yield ids, mask


def _assert_same_logits(jax_model, torch_model, vocab):
    forward = jax.jit(lambda m, ids, mask: m(ids, attention_mask=mask).logits.astype(jnp.float32))
    for ids, mask in _prompts(vocab):
        ours = np.asarray(forward(jax_model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        with torch.no_grad():
            reference = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                    position_ids=torch.from_numpy(positions)).logits.float().numpy()
        real = mask.astype(bool)
        assert np.abs(ours - reference)[real].max() <= 1e-4, ids.shape


def test_lora_merged_export_is_a_stock_llama_with_the_same_logits(tmp_path):
    config = _config(moge=False, tied=False)
    checkpoint, model = _lm_checkpoint(tmp_path, config)
    out = export_hf(checkpoint, tmp_path / "hf", progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_logits(model, hf.eval(), config.vocab_size)


def test_lora_peft_adapter_loads_with_stock_peft_and_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    config = _config(moge=False)
    checkpoint, model = _lm_checkpoint(tmp_path, config, seed=1)
    out = export_hf(checkpoint, tmp_path / "hf", format="peft", progress=False)
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == adapter_config["lora_alpha"] == 4
    names = set(st.list_tensors(out / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names and len(names) == 4 * 7 * 2
    base = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # the base folder alone is the frozen model: its logits differ from the trained one's
    ids = torch.from_numpy(np.arange(7)[None])
    frozen = base(input_ids=ids).logits.detach().numpy()
    with_adapter = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    assert np.abs(with_adapter(input_ids=ids).logits.detach().numpy() - frozen).max() > 1e-3
    _assert_same_logits(model, with_adapter, config.vocab_size)
    assert cli_main(["check-hf", "--checkpoint", str(checkpoint), "--hf", str(out), "--seq-lens", "7,64"]) == 0


@pytest.mark.parametrize("shared, norm_topk, expert_ranks, layer_list, dense",
                         [(1, False, None, (), [0, 1]), (0, True, (4, 2, 3, 4, 1), (0, 2), [1, 3])],
                         ids=["shared-expert", "no-shared-normalised-mixed-ranks-layer-list"])
def test_moge_export_is_a_stock_qwen2_moe_with_the_same_logits(tmp_path, shared, norm_topk, expert_ranks, layer_list,
                                                               dense):
    config = _config(moge=True, shared=shared, norm_topk=norm_topk, expert_ranks=expert_ranks, layer_list=layer_list)
    checkpoint, model = _lm_checkpoint(tmp_path, config, seed=2)
    out = export_hf(checkpoint, tmp_path / "hf", progress=False)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2MoeForCausalLM"] and hf_config["mlp_only_layers"] == dense
    assert hf_config["qkv_bias"] is False and hf_config["norm_topk_prob"] is norm_topk
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_logits(model, hf.eval(), config.vocab_size)


def _randomize_graph_side(model, seed):
    """Batch-norm statistics and eps away from their defaults, so every term of the GIN matters."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model.graph_tower, nnx.Variable)):
        value = np.asarray(variable.get_value())
        if path[-1] in ("mean", "bias"):
            variable.set_value(jnp.asarray(0.1 * rng.standard_normal(value.shape), jnp.float32))
        elif path[-1] in ("var", "scale"):
            variable.set_value(jnp.asarray(0.5 + rng.random(value.shape), jnp.float32))
        elif path[-1] == "eps":
            variable.set_value(jnp.asarray(0.2 * rng.standard_normal(value.shape), jnp.float32))
    return model


def test_a_full_model_export_with_the_torch_graph_encoder_gives_the_same_logits(tmp_path):
    from omnimol_jax.constants import IMAGE_TOKEN_ID
    from omnimol_jax.convert.torch_graph_encoder import GraphEncoder
    from omnimol_jax.data.featurize import selfies_to_graph
    from omnimol_jax.inference.decoding import build_prompt_batch

    config = _config(moge=True)
    graph = GraphConfig(num_layers=2, hidden_size=32, projector_type="mlp2x_silu")
    model = _randomize_graph_side(_trained(omnimol_constructor(config, graph, seed=3)(), 3), 3)
    checkpoint = save_omnimol_checkpoint(tmp_path / "full", config, graph, model)
    out = export_hf(checkpoint, tmp_path / "hf", progress=False)
    meta = json.loads((out / "graph_encoder.json").read_text())
    assert meta["graph"]["num_layers"] == 2 and meta["projector_layers"] == ["linear_in", "linear_out"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    encoder = GraphEncoder.from_pretrained(out)

    # prompts: text, the molecule's graph slots, text; a second row text-only and shorter (left-padded)
    rng = np.random.default_rng(0)
    molecules = ["[C][C][=C][C][=C][C][=C][Ring1][=Branch1][O]", None]
    for tail in (5, 480):
        graphs = [selfies_to_graph(m, graph.feature_mode) if m else None for m in molecules]
        prompts = [list(rng.integers(0, 384, 4)) + [IMAGE_TOKEN_ID] * graphs[0].num_nodes +
                   list(rng.integers(0, 384, tail)), list(rng.integers(0, 384, tail // 2 + 1))]
        batch = build_prompt_batch(prompts, graphs, pad_token_id=0)
        ours = np.asarray(model(jnp.asarray(batch.input_ids), batch.graphs,
                                attention_mask=jnp.asarray(batch.attention_mask)).logits)
        ids, mask = torch.from_numpy(batch.input_ids.astype(np.int64)), torch.from_numpy(
            batch.attention_mask.astype(np.int64))
        with torch.no_grad():
            embeds = encoder.inputs_embeds(hf, ids, molecules)
            reference = hf(inputs_embeds=embeds, attention_mask=mask,
                           position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits.numpy()
        real = batch.attention_mask.astype(bool)
        assert np.abs(ours - reference)[real].max() <= 1e-4, tail
    atoms = graphs[0].num_nodes
    short = torch.tensor([[IMAGE_TOKEN_ID] * (atoms - 1) + [1, 2], [1] * (atoms + 1)])
    with pytest.raises(ValueError, match=f"row 0: {atoms - 1} graph slots but {atoms} atoms"):
        encoder.inputs_embeds(hf, short, molecules)
    assert cli_main(["check-hf", "--checkpoint", str(checkpoint), "--hf", str(out), "--seq-lens", "7,64"]) == 0


def test_formats_that_cannot_carry_a_weight_are_refused_and_write_nothing(tmp_path, capsys):
    checkpoint, _ = _lm_checkpoint(tmp_path, _config(moge=True))
    for fmt in ("llama", "peft"):
        with pytest.raises(HFConversionError, match=r"format (llama|peft) cannot carry \d+ weights \(layers/2/mlp/"
                                                    r"expert_down_lora/a.*--format qwen2-moe"):
            export_hf(checkpoint, tmp_path / fmt, format=fmt, progress=False)
        assert not (tmp_path / fmt).exists()
    plain_config = model_config_from_preset("tiny", vocab_size=384)
    plain = save_model_checkpoint(tmp_path / "plain", plain_config,
                                  module_state(LlamaForCausalLM(plain_config, rngs=nnx.Rngs(0))))
    with pytest.raises(HFConversionError, match="format peft writes a LoRA adapter; this checkpoint has none"):
        export_hf(plain, tmp_path / "x", format="peft", progress=False)
    scaled = dataclasses.replace(_config(moge=True), moge=dataclasses.replace(_config(moge=True).moge,
                                                                              routed_scaling_factor=2.5))
    scaled_checkpoint, _ = _lm_checkpoint(tmp_path, scaled, name="scaled")
    with pytest.raises(HFConversionError, match="routed_scaling_factor=2.5 has no Qwen2-MoE counterpart"):
        export_hf(scaled_checkpoint, tmp_path / "y", progress=False)
    assert cli_main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "z"), "--format",
                     "llama"]) == 2
    assert "cannot carry" in capsys.readouterr().err and not (tmp_path / "z").exists()
    assert load_llama(checkpoint) is not None  # the source is untouched
