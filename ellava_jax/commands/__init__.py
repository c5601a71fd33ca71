"""Sub-commands of `ellava`, one module each (see ellava_jax/cli.py)."""
