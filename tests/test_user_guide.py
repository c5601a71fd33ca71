"""docs/user-guide.md's plan tables are exactly what `ellava plan` prints (no stale copy)."""

import re
import shlex
from pathlib import Path

import pytest

from ellava_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```\n\$ ellava (plan .*?)\n```\n(.*?)(?=\n\n```|\Z)", re.S)


def _plans() -> list[tuple[str, str]]:
    """(command, output) of every plan between plan-table markers, in the guide's order."""
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    tables = re.findall(r"<!-- plan-table:begin -->\n(.*?)\n<!-- plan-table:end -->", guide, re.S)
    assert tables, "docs/user-guide.md lacks the plan-table markers"
    return [(cmd, out.strip()) for t in tables for cmd, out in BLOCK.findall(t)]


def test_the_guide_shows_the_7b_and_13b_plans():
    """One device: 7B and 13B; then on 8 devices, 7B (data=2 x model=4) and 13B (model=8)."""
    plans = _plans()
    assert [
        ("--model llava-1.5-7b" in c, "--model llava-1.5-13b" in c, "--mesh" in c) for c, _ in plans
    ] == [(True, False, False), (False, True, False), (True, False, True), (False, True, True)]
    for _, out in plans:
        assert out.startswith("plan for configs/llava-1.5-7b.yaml") and "| fitness:" in out


@pytest.mark.slow
def test_plan_tables_in_guide_are_the_command_output(capsys):
    for cmd, out in _plans():
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ROOT)
            assert main(shlex.split(cmd)) == 0
        printed = capsys.readouterr().out.strip()
        assert printed == out, f"the table of `ellava {cmd}` in docs/user-guide.md is stale"
