"""The `ellava` command: parses flags and hands over to one module of `ellava_jax.commands`.

Each module there defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`; a new
sub-command is a new module, nothing else changes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from ellava_jax import commands
from ellava_jax.errors import run_reporting


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

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    path = os.path.join(os.path.expanduser("~"), ".cache", "ellava-jax", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax  # here: `ellava --help` and bad flags answer without loading JAX

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


def main(argv: list[str] | None = None) -> int:
    """Runs one sub-command; returns its exit code.

    0 success; 2 a user's error (one line naming the file, key or value); 1 a failure of the
    environment (disk full, read-only target; one line); 130 Ctrl-C and 143 SIGTERM, both after
    cleaning up; 70 an internal bug (its traceback and a request to report it): see
    `errors.run_reporting`, which the benchmark scripts share.
    """

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the sub-command's own arguments (a command may re-run itself)

    def body() -> int:
        if hasattr(args, "coordinator"):  # before anything starts JAX's backend
            from ellava_jax import distributed

            distributed.initialize(args)
        use_compilation_cache()
        return int(args._run(args) or 0)

    return run_reporting(f"ellava {args.command}", body)


if __name__ == "__main__":
    sys.exit(main())
