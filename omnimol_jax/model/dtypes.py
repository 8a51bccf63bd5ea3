"""Config dtype names -> jax dtypes (the one table; configs name dtypes as strings)."""
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
    return DTYPES[name]
