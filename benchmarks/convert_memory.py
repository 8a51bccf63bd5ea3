"""Peak host memory of `import-hf` and `export-hf`, against the sizes that bound it.

The converter should need about one tensor beyond its output (import) or its input (export), never the
whole model twice. Each conversion runs in a fresh subprocess; the peak is the kernel's RSS high-water
mark (VmHWM), reset after imports so that library code does not count.

    python benchmarks/convert_memory.py [--hidden 1024 --layers 4 --vocab 32000]
Prints one JSON object.
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
from omnimol_jax.convert.hf_llama import export_hf, import_hf
import omnimol_jax.checkpoint as ck
import numpy as np
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
    args = parser.parse_args()
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
