"""`python -m omnimol_jax.cli ...` is `omnimol ...`."""
import sys

from omnimol_jax.cli import main

sys.exit(main())
