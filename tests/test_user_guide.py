"""docs/user-guide.md's memory table is exactly what scripts/memory_table.py prints (no stale copy)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_table_in_guide_matches_script():
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    m = re.search(r"<!-- memory-table:begin -->\n(.*?)\n<!-- memory-table:end -->", guide, re.S)
    assert m, "docs/user-guide.md lacks the memory-table markers"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "memory_table.py")],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    assert m.group(1).strip() == out, (
        "the table in docs/user-guide.md is stale: paste the output of "
        "`python scripts/memory_table.py` between the markers"
    )
    assert (
        "7,063,427,072" in out
    )  # LLaVA-1.5-7B's parameter count (the llava-1.5-7b preset, by jax.eval_shape)
