"""The README's environment table is the one settings.py generates, so the two never drift; and
every file the README and docs/ point at is in the repository (a user's clone has nothing else)."""

import re
from pathlib import Path

from sagellm.settings import VARS, markdown_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# A path into the repository, as the docs write them: `bench/loadgen.py`, `sagellm/api/chat.py`.
REPO_PATH = re.compile(r"`((?:\.\./)*(?:bench|docs|sagellm|tests|container|deploy)/[\w./-]+)`")


def test_readme_lists_every_variable_as_settings_defines_it():
    text = README.read_text()
    assert markdown_table() in text
    for var in VARS:
        for name in var.names:
            assert f"`{name}`" in text


def test_docs_point_only_at_files_in_the_repository():
    outside = [f"{doc.name}: {m}" for doc in DOCS for m in re.findall(r"\.\./[\w./-]+", doc.read_text())]
    assert outside == []
    missing = [f"{doc.name}: {path}" for doc in DOCS for path in REPO_PATH.findall(doc.read_text())
               if not (ROOT / path.rstrip("/.")).exists()]
    assert missing == []
    assert REPO_PATH.findall("see `bench/loadgen.py`") == ["bench/loadgen.py"]
