"""omnimol-jax: Omni-Mol (multitask molecular LLM) in JAX/Flax."""

__version__ = "0.1.0"
