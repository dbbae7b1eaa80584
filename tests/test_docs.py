"""README.md is a front page and docs/ the reference: every relative link in them
resolves, to a file of the checkout and, with a #fragment, to a heading there as
GitHub renders its anchor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
SCHEME = re.compile(r"^(?:[a-z][a-z0-9+.\-]*:|//)", re.I)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks: a link or heading in code is not one."""
    return FENCE.sub("", text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation
    dropped (letters, digits, `_`, `-` and spaces stay), each space a hyphen."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[len(m.group(1)):-len(m.group(1))], heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #fragment that leads somewhere in a markdown file; repeats get -1, -2, ..."""
    text = prose(path.read_text())
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(text):
        slug = github_anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found | set(HTML_ANCHOR.findall(text))


def links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(path.read_text()))
    return INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text) + HTML_LINK.findall(text)


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """The relative links of one markdown file that lead nowhere, each with why."""
    broken = []
    for link in links(path):
        if not link or SCHEME.match(link):
            continue
        target, _, fragment = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.is_relative_to(root.resolve()):
            broken.append(f"{link}: outside the checkout")
        elif not resolved.exists():
            broken.append(f"{link}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{link}: no heading with anchor #{fragment} in {resolved.name}")
    return broken


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert links(page), f"{page.name} links nowhere"
    assert broken_links(page) == []


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the reference goes in docs/"


def test_the_readme_keeps_the_two_quick_start_commands():
    readme = README.read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make demo +# ", quick_start, re.M) and re.search(r"^make test +# ", quick_start, re.M)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in links(README)}
    assert [page.name for page in DOCS.glob("*.md") if page.resolve() not in linked] == []


def test_the_pbs_notes_name_the_openpbs_the_bed_builds():
    from tests.bed.openpbs import OPENPBS_VERSION

    notes = (DOCS / "pbs-slurm.md").read_text()
    assert OPENPBS_VERSION in notes
    assert "Torque wrappers" in notes and "slurm-wlm-torque" in notes


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Worker jobs: grow, shrink, adapt (`scale`)", "worker-jobs-grow-shrink-adapt-scale"),
    ("Ray in a container image (`container_image`)", "ray-in-a-container-image-container_image"),
    ("Lifecycle: nothing outlives its purpose", "lifecycle-nothing-outlives-its-purpose"),
    ("Prefect tasks on the cluster (`flows/ray_tasks.py`)", "prefect-tasks-on-the-cluster-flowsray_taskspy"),
    ("A run's parameters", "a-runs-parameters"),
    ("SLURM and PBS notes", "slurm-and-pbs-notes"),
    ("Security -- the [model](x.md)", "security----the-model"),
])
def test_anchors_are_githubs(heading, anchor):
    assert github_anchor(heading) == anchor


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# There\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "# Page", "",
        "[ok](docs/there.md#a-section) [ok](docs/there.md#a-section-1) [ok](#page) [web](https://example.org/x)",
        "[missing](docs/gone.md) [bad anchor](docs/there.md#b-section) [up](../elsewhere.md)",
        "`[in code](nowhere.md)`", "", "```", "[in a fence](nowhere.md)", "```", "",
        '<img src="docs/gone.png">', "[ref]: docs/also-gone.md",
    ]))
    assert broken_links(page, root=tmp_path) == [
        "docs/gone.md: no such file",
        "docs/there.md#b-section: no heading with anchor #b-section in there.md",
        "../elsewhere.md: outside the checkout",
        "docs/also-gone.md: no such file",
        "docs/gone.png: no such file",
    ]
