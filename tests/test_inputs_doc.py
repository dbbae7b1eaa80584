"""The README's inputs table, the run form and `--help` name the same inputs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from flows.inputs_doc import README, form_fields, inputs_table, readme_section
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


def test_the_readme_holds_the_table_made_from_the_form():
    assert readme_section(README.read_text()) == inputs_table(), "README.md's inputs table is stale: run make docs"


@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_help_lists_exactly_the_forms_fields():
    table_flags = set(re.findall(r"\| `(--[a-z0-9.\-]+)` \|", inputs_table()))
    assert len(table_flags) == len(form_fields())
    assert help_flags() == table_flags


def test_every_form_field_has_a_label_and_a_description():
    assert [(group, field) for group, field, prop in form_fields()
            if not (prop.get("title") and prop.get("description"))] == []
