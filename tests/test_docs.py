"""The user guide stays true: every `bash` block of docs/*.md runs, in order, in a fresh folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
PAGES = sorted(p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))


def test_the_guide_has_pages_with_commands():
    assert {p.name for p in PAGES} >= {"quickstart.md", "data.md", "semi-collaborative.md", "full-collaborative.md", "report.md"}


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_of_a_page_runs(page, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    blocks = BLOCK.findall(page.read_text())
    for i, block in enumerate(blocks, 1):
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{page.name}, block {i} of {len(blocks)} failed ({run.returncode}):\n{block}\n{run.stderr[-3000:]}"
    commands = sum(1 for b in blocks for line in b.splitlines() if line.startswith("cairn "))
    print(f"{page.name}: {len(blocks)} blocks, {commands} cairn commands")
