"""`omnimol import-hf` and `omnimol export-hf`."""
from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-hf", help="convert a Hugging Face Llama folder into an omnimol checkpoint",
        description="Reads config.json and model.safetensors (single or sharded with an index) from a local "
                    "HF folder and writes an Orbax checkpoint. Tokenizer files are carried along.")
    p.add_argument("--hf", required=True, help="HF model folder (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store parameters in this dtype (default: the HF config's dtype)")
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


def _run(fn, **kwargs) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    path = fn(**kwargs)
    print(f"wrote {path}")
    return 0


def _import_hf(args) -> int:
    from omnimol_jax.convert.hf_llama import import_hf
    return _run(import_hf, hf_dir=args.hf, out=args.out, dtype=args.dtype, overwrite=args.overwrite)


def _export_hf(args) -> int:
    from omnimol_jax.convert.hf_export import export_hf
    return _run(export_hf, checkpoint=args.checkpoint, out=args.out, format=args.format, dtype=args.dtype,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite)
