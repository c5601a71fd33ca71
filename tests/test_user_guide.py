"""docs/user-guide.md's plan tables are exactly what `ellava plan` prints (no stale copy)."""

import re
import shlex
from pathlib import Path

import pytest

from ellava_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```\n\$ ellava (plan .*?)\n```\n(.*?)(?=\n\n```|\Z)", re.S)


def _plans() -> list[tuple[str, str]]:
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    m = re.search(r"<!-- plan-table:begin -->\n(.*?)\n<!-- plan-table:end -->", guide, re.S)
    assert m, "docs/user-guide.md lacks the plan-table markers"
    return [(cmd, out.strip()) for cmd, out in BLOCK.findall(m.group(1))]


def test_the_guide_shows_the_7b_and_13b_plans():
    plans = _plans()
    assert [("--model llava-1.5-7b" in c, "--model llava-1.5-13b" in c) for c, _ in plans] == [
        (True, False),
        (False, True),
    ]
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
