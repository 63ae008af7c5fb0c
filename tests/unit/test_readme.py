"""The README's environment table is the one settings.py generates, so the two never drift."""

from pathlib import Path

from sagellm.settings import VARS, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_variable_as_settings_defines_it():
    text = README.read_text()
    assert markdown_table() in text
    for var in VARS:
        for name in var.names:
            assert f"`{name}`" in text
