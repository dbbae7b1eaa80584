"""docs/inputs.md's inputs table, the run form and `--help` name the same inputs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import flows.inputs_doc as inputs_doc
from flows.inputs_doc import BEGIN, INPUTS_DOC, README, doc_section, form_fields, inputs_table
from tests.helpers import REPO

# Flags of the command line that are not fields of the form: the groups as one JSON
# value, the negations of booleans, and the dry run.
NOT_FIELDS = {"--help", "--dry-run", "--slurm", "--pbs", "--scale", "--runtime-env"}


def help_flags() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "flows.ray_cluster", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    options = out.split("\noptions:", 1)[1]
    flags = set(re.findall(r"^  (--[a-z][a-z0-9.\-]*)", options, re.M))  # each option's own line
    return {flag for flag in flags if not flag.startswith("--no-")} - NOT_FIELDS


def test_docs_inputs_holds_the_table_made_from_the_form():
    assert doc_section(INPUTS_DOC.read_text()) == inputs_table(), "docs/inputs.md's inputs table is stale: run make docs"


def test_the_table_has_one_home():
    """README.md links to docs/inputs.md and holds no copy of the table to go stale."""
    readme = README.read_text()
    assert BEGIN not in readme and "| CLI flag |" not in readme
    assert "(docs/inputs.md)" in readme


def test_write_replaces_the_table_in_docs_inputs_and_nothing_else(tmp_path, monkeypatch):
    readme, doc = tmp_path / "README.md", tmp_path / "docs" / "inputs.md"
    doc.parent.mkdir()
    readme.write_text("# front page\n")
    doc.write_text(f"# Inputs\n\nbefore\n\n{BEGIN}\n| stale |\n<!-- /inputs -->\n\nafter\n")
    monkeypatch.setattr(inputs_doc, "README", readme)
    monkeypatch.setattr(inputs_doc, "INPUTS_DOC", doc)
    assert inputs_doc.main(["--write"]) == 0
    text = doc.read_text()
    assert doc_section(text) == inputs_table()
    assert text.startswith("# Inputs\n\nbefore\n\n") and text.endswith("<!-- /inputs -->\n\nafter\n")
    assert readme.read_text() == "# front page\n"


@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_help_lists_exactly_the_forms_fields():
    table_flags = set(re.findall(r"\| `(--[a-z0-9.\-]+)` \|", inputs_table()))
    assert len(table_flags) == len(form_fields())
    assert help_flags() == table_flags


def test_every_form_field_has_a_label_and_a_description():
    assert [(group, field) for group, field, prop in form_fields()
            if not (prop.get("title") and prop.get("description"))] == []
