"""Peak host memory of `import-hf` and `export-hf`, against the sizes that bound it.

The converter should need about one tensor beyond its output (import) or its input (export), never the
whole model twice. Each conversion runs in a fresh subprocess; the peak is the kernel's RSS high-water
mark (VmHWM), reset after imports so that library code does not count.

    python benchmarks/convert_memory.py [--hidden 1024 --layers 4 --vocab 32000]
    python benchmarks/convert_memory.py --moge small
    python benchmarks/convert_memory.py --release small
The second form exports a MoGE checkpoint of a preset (LoRA on every projection, MoGE on the second half, B and
the routers random) as a Qwen2-MoE folder, whose output is several times the stored model (one merged FFN per
expert): the bound is still the stored model plus tensors in flight. The third writes a full Omni-Mol model of the
preset with MoGE in the released layout (export-release) and measures `import-release` of it and `export-release`
back. The fourth imports a GGUF file (default: the packaged SmolLM2-135M-Instruct, Q4_1) into an fp32 checkpoint:
    python benchmarks/convert_memory.py --gguf smollm2-135m-instruct
its bound is the same (the fp32 output plus tensors in flight), with the memory-mapped file's touched pages and the
tokenizer transformers builds from the file on top. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
from pathlib import Path
from omnimol_jax.convert.hf_export import export_hf
from omnimol_jax.convert.hf_llama import import_hf
from omnimol_jax.convert.release import export_release, import_release
import omnimol_jax.checkpoint as ck
import numpy as np
import torch  # release files are torch .bin files; its import is library code, not conversion memory
if sys.argv[1] == "import-gguf":  # library code too: transformers' GGUF loader and the Llama module tree
    import transformers.modeling_gguf_pytorch_utils, gguf
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM
    from omnimol_jax.convert.gguf_llama import import_gguf
# Warm up Orbax/tensorstore once so their one-time allocations are not counted.
with __import__("tempfile").TemporaryDirectory() as d:
    ck.save_params(Path(d), {("w",): np.zeros(4, np.float32)})
    ck.load_params(Path(d))

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = rss("VmRSS")
start = time.perf_counter()
if sys.argv[1] == "import":
    import_hf(sys.argv[2], sys.argv[3], progress=False)
elif sys.argv[1] == "import-release":
    import_release(sys.argv[2], sys.argv[3], moleculestm=sys.argv[4], base=sys.argv[5], progress=False)
elif sys.argv[1] == "import-gguf":
    import_gguf(sys.argv[2], sys.argv[3], progress=False)
elif sys.argv[1] == "export-release":
    export_release(sys.argv[2], sys.argv[3], base=sys.argv[4], progress=False)
else:
    export_hf(sys.argv[2], sys.argv[3], progress=False)
print(json.dumps({"baseline_rss": base, "peak_rss": rss("VmHWM"), "seconds": time.perf_counter() - start}))
"""


def write_random_hf(folder: Path, hidden: int, layers: int, vocab: int, ffn: int, heads: int, kv_heads: int) -> dict:
    from omnimol_jax.config import ModelConfig
    from omnimol_jax.convert import safetensors_io as st
    from omnimol_jax.convert.hf_llama import hf_config_from_model, tensor_table

    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, tie_word_embeddings=False)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config_from_model(config, "float32")))
    rng = np.random.default_rng(0)
    planned = [st.PlannedTensor(m.hf_name, np.dtype(np.float32), m.hf_shape,
                                (lambda shape: lambda: rng.standard_normal(shape, dtype=np.float32))(m.hf_shape))
               for m in tensor_table(config)]
    st.write_checkpoint(folder, planned, max_shard_bytes=st.parse_size("200MB"))
    sizes = [t.nbytes for t in planned]
    return {"model_bytes": sum(sizes), "largest_tensor_bytes": max(sizes), "tensors": len(sizes)}


def write_moge_checkpoint(folder: Path, preset: str, full: bool = False) -> dict:
    """A random LoRA + MoGE checkpoint of `preset` (B and routers nonzero, so every merge does real work); with
    `full`, the whole Omni-Mol model (graph tower and projector too)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from omnimol_jax.checkpoint import module_state, save_model_checkpoint, write_metadata
    from omnimol_jax.config import GraphConfig, model_config_from_preset
    from omnimol_jax.model.build import omnimol_constructor
    from omnimol_jax.model.llama import LlamaForCausalLM
    from omnimol_jax.model.lora import LoRAWeight

    config = model_config_from_preset(preset, lora={"enabled": True, "rank": 64},
                                      moge={"enabled": True, "layers": "second_half"})
    graph = GraphConfig()
    model = omnimol_constructor(config, graph)() if full else LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    key = jax.random.key(1)
    for path, variable in nnx.to_flat_state(nnx.state(model, LoRAWeight)):
        if path[-1] == "b":
            key, sub = jax.random.split(key)
            variable.set_value(0.01 * jax.random.normal(sub, variable.get_value().shape, jnp.float32))
    params = module_state(model)
    save_model_checkpoint(folder, config, params)
    if full:
        import dataclasses
        write_metadata(folder, config, {"graph": dataclasses.asdict(graph)})
    sizes = [int(np.prod(v.shape)) * v.dtype.itemsize for v in params.values()]
    return {"model_bytes": sum(sizes), "largest_tensor_bytes": max(sizes), "tensors": len(sizes), "preset": preset}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--moge", metavar="PRESET", help="measure the Qwen2-MoE export of a MoGE model instead")
    parser.add_argument("--release", metavar="PRESET", help="measure import-release / export-release instead")
    parser.add_argument("--gguf", metavar="FILE", help="measure import-hf --gguf of a GGUF file or packaged model")
    args = parser.parse_args()
    if args.gguf:
        from omnimol_jax.convert.gguf_llama import open_gguf_llama, resolve_gguf
        from omnimol_jax.convert.hf_llama import tensor_table

        config = open_gguf_llama(args.gguf).config
        sizes = [int(np.prod(m.ours_shape)) * 4 for m in tensor_table(config)]
        with tempfile.TemporaryDirectory() as tmp:
            imported = run_child("import-gguf", str(args.gguf), str(Path(tmp) / "ckpt"))
        extra = imported["peak_rss"] - imported["baseline_rss"]
        model = sum(sizes)
        print(json.dumps({"benchmark": "convert_memory_gguf", "file": str(resolve_gguf(args.gguf)),
                          "file_bytes": resolve_gguf(args.gguf).stat().st_size, "model_bytes": model,
                          "largest_tensor_bytes": max(sizes), "tensors": len(sizes),
                          "import": {"seconds": round(imported["seconds"], 2), "peak_extra_bytes": extra,
                                     "peak_extra_over_model": round(extra / model, 3)}}, indent=2))
        return
    if args.release:
        from omnimol_jax.convert.release import export_release

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            sizes = write_moge_checkpoint(tmp / "ckpt", args.release, full=True)
            release = export_release(tmp / "ckpt", tmp / "release", progress=False)
            release_bytes = sum(f.stat().st_size for f in release.iterdir() if f.is_file())
            imported = run_child("import-release", str(release), str(tmp / "imported"),
                                 str(release / "molecule_model.pth"), str(release / "base"))
            exported = run_child("export-release", str(tmp / "imported"), str(tmp / "again"), str(release / "base"))
        result = {"benchmark": "convert_memory_release", **sizes, "release_files_bytes": release_bytes}
        for name, r in (("import_release", imported), ("export_release", exported)):
            extra = r["peak_rss"] - r["baseline_rss"]
            result[name] = {"seconds": round(r["seconds"], 2), "peak_extra_bytes": extra,
                            "peak_extra_over_model": round(extra / sizes["model_bytes"], 3)}
        print(json.dumps(result, indent=2))
        return
    if args.moge:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            sizes = write_moge_checkpoint(tmp / "ckpt", args.moge)
            exported = run_child("export", str(tmp / "ckpt"), str(tmp / "out"))
            output_bytes = sum(f.stat().st_size for f in (tmp / "out").glob("*.safetensors"))
        extra = exported["peak_rss"] - exported["baseline_rss"]
        print(json.dumps({"benchmark": "convert_memory_moge_export", **sizes, "output_bytes": output_bytes,
                          "export": {"seconds": round(exported["seconds"], 2), "peak_extra_bytes": extra,
                                     "peak_extra_over_model": round(extra / sizes["model_bytes"], 3)}}, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = write_random_hf(tmp / "hf", args.hidden, args.layers, args.vocab, args.ffn, args.heads, args.kv_heads)
        imported = run_child("import", str(tmp / "hf"), str(tmp / "ckpt"))
        exported = run_child("export", str(tmp / "ckpt"), str(tmp / "out"))
    result = {"benchmark": "convert_memory", **sizes}
    for name, r in (("import", imported), ("export", exported)):
        extra = r["peak_rss"] - r["baseline_rss"]
        result[name] = {"seconds": round(r["seconds"], 2), "peak_extra_bytes": extra,
                        "peak_extra_over_model": round(extra / sizes["model_bytes"], 3),
                        "peak_extra_minus_model_over_largest_tensor":
                            round((extra - sizes["model_bytes"]) / sizes["largest_tensor_bytes"], 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
