"""The `ellava` command: parses flags and hands over to one module of `ellava_jax.commands`.

Each module there defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`; a new
sub-command is a new module, nothing else changes.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ellava_jax import commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ellava",
        description="EfficientLLaVA auto-pruning and FitPrune token pruning for LLaVA, in JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def use_compilation_cache() -> str | None:
    """Keeps compiled XLA programs between runs, in ~/.cache/ellava-jax/xla.

    A second `ellava search` on the toy skips most of its compilation (2 rounds, 2 CPU cores:
    67 s against 91 s). JAX_COMPILATION_CACHE_DIR, when set, wins (empty: no cache); a
    directory that cannot be made leaves the cache off. Returns the directory in use or None.
    """
    import os

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    path = os.path.join(os.path.expanduser("~"), ".cache", "ellava-jax", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_compilation_cache()
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        # Bad input: one clear line naming the file / key / value, no traceback.
        print(f"ellava {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
