"""`ellava report DIR`: report.md and PNG plots from a demo (or search) run directory."""

from __future__ import annotations

NAME = "report"
HELP = (
    "Write DIR/report.md and its plots (accuracy vs CPU speedup, per-layer sparsity, fitness "
    "per round, accuracy by category) from the files a demo or search run wrote."
)


def add_arguments(p):
    p.add_argument("dir", help="run directory (ellava demo --out, or ellava search --out)")
    p.add_argument("--plots", default=None, help="where the PNGs go (default: DIR/report/)")


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    from ellava_jax.report.report import write_report

    for path in write_report(args.dir, args.plots):
        print(f"wrote {path}")
    return 0
