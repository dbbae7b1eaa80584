"""The table of inputs in docs/inputs.md, made from the run form's own schema:

    python -m flows.inputs_doc          # print the table
    python -m flows.inputs_doc --write  # replace it in docs/inputs.md (make docs)

One row per field of the `ray_cluster` flow's form, in form order, with the CLI
flag that sets the same field; tests/test_inputs_doc.py checks that docs/inputs.md
holds exactly this table and that `--help` lists exactly these flags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect.utilities.callables import parameter_schema

from flows.ray_cluster import ray_cluster
from tasks.settings import GROUPS

# the checkout's (make docs): its README.md says this is a checkout; an installed package has neither
README = Path(__file__).resolve().parent.parent / "README.md"
INPUTS_DOC = Path(__file__).resolve().parent.parent / "docs" / "inputs.md"
BEGIN, END = "<!-- inputs: made by python -m flows.inputs_doc -->", "<!-- /inputs -->"


def cli_flag(group: str, field: str) -> str:
    """The command line's flag of a field: flat for the workflow's groups, dotted for the others."""
    kebab = field.replace("_", "-")
    if not group:
        return f"--{kebab}"
    return f"--{kebab}" if group in GROUPS else f"--{group.replace('_', '-')}.{kebab}"


def form_fields() -> list[tuple[str, str, dict]]:
    """(group, field, its schema) for every field of the form, in form order; group '' at the top."""
    schema = parameter_schema(ray_cluster).model_dump_for_openapi()
    definitions = schema["definitions"]
    rows = []
    for name, prop in sorted(schema["properties"].items(), key=lambda item: item[1]["position"]):
        ref = prop.get("$ref", "").rsplit("/", 1)[-1]
        inner = definitions.get(ref, {}).get("properties")
        if inner is None:
            rows.append(("", name, prop))
            continue
        rows.extend((name, field, sub) for field, sub in sorted(inner.items(), key=lambda item: item[1]["position"]))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(prop: dict) -> str:
    value = prop.get("default")
    if value in (None, "", [], {}):
        return ""
    return f"`{value if isinstance(value, str) else json.dumps(value)}`"


def inputs_table() -> str:
    lines = ["| form | field | CLI flag | default | what it is |", "|---|---|---|---|---|"]
    for group, field, prop in form_fields():
        lines.append(
            f"| {group or '(top)'} | {_cell(prop.get('title', field))} | `{cli_flag(group, field)}` "
            f"| {_cell(_default(prop))} | {_cell(prop.get('description', ''))} |"
        )
    return "\n".join(lines) + "\n"


def doc_section(text: str) -> str:
    """The table as docs/inputs.md holds it now."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n") + "\n"


def main(argv: list[str]) -> int:
    table = inputs_table()
    if "--write" not in argv:
        sys.stdout.write(table)
        return 0
    if not (README.is_file() and INPUTS_DOC.is_file()):  # an installed package has no docs to keep in step
        print(f"--write edits the checkout's docs/inputs.md; there is no checkout's README.md and docs/ at {README.parent}",
              file=sys.stderr)
        return 2
    text = INPUTS_DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    INPUTS_DOC.write_text(text[:start] + "\n" + table + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
