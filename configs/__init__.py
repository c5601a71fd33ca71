"""The shipped search recipes: one YAML file per run (`ellava search --config toy` or
`--config configs/toy.yaml`), read by `ellava_jax.search.settings`.

A package only so that the wheel carries the files (package data, read with importlib.resources);
it holds no code.
"""
