"""The map of the package is true, and every reference in the code resolves inside the
repository: a newcomer finds each concern from the tree, the map and the docs alone."""

from __future__ import annotations

import re
from pathlib import Path

import bridge

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bridge"
SCANNED = ("bridge", "tests", "bench", "examples")

# A map line: four spaces, a module name, at least two spaces, what it holds.
_MAP_LINE = re.compile(r"^    ([a-z_][a-z0-9_.]*)\s{2,}\S|^    ([a-z_][a-z0-9_.]*)$")


def _modules() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            names.add(".".join(parts))
    return names


def _mapped(text: str) -> set[str]:
    found = set()
    for line in text.splitlines():
        m = _MAP_LINE.match(line)
        if m:
            found.add(m.group(1) or m.group(2))
    return found


def test_the_package_docstring_maps_every_module() -> None:
    modules = _modules()
    assert "client.responder" in modules and "wire" in modules  # the walk sees the tree
    assert _mapped(bridge.__doc__ or "") == modules


def test_the_readme_development_section_holds_the_same_map() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Development", 1)[1].split("\n## ", 1)[0]
    assert _mapped(section) == _modules()


# References to documents: a path in the repository, optionally a section (`docs/x.md §4.2`).
_PATH = re.compile(
    r"(?<![\w/.-])((?:docs|deploy|bench|examples|tests|bridge|scripts)/[\w./-]*\w\."
    r"(?:md|yaml|yml|json|py|toml))(?:,? ?§ ?(\d+(?:\.\d+)*))?"
)
# Forms that point outside the repository (or nowhere in particular).
_OUTSIDE = re.compile(
    r"CONTRACT(?:\.md)?\b|\.\./shared/|/work/shared|(?<![\w/])(?:webhooks|api-v4)\.md"
)


def _sections(doc: Path) -> set[str]:
    """The numbers of a Markdown document's headings (`## 4.`, `### 2.2 ...`)."""
    out = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            out.add(m.group(1))
    return out


def _scanned_files() -> list[Path]:
    # This file is left out: it spells the forbidden forms to look for them.
    here = Path(__file__).resolve()
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if p.resolve() != here)


def unresolved(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT)
    bad = [f"{rel}: {m.group(0)!r} points outside the repository" for m in _OUTSIDE.finditer(text)]
    for m in _PATH.finditer(text):
        target, section = ROOT / m.group(1), m.group(2)
        if not target.exists():
            bad.append(f"{rel}: {m.group(1)} does not exist")
        elif section and target.suffix == ".md" and section not in _sections(target):
            bad.append(f"{rel}: {m.group(1)} has no section {section}")
    return bad


def test_every_reference_in_the_code_resolves_inside_the_repository() -> None:
    files = _scanned_files()
    assert len(files) > 50
    bad = {line for path in files for line in unresolved(path)}
    assert bad == set()


def test_the_reference_check_catches_what_it_should(tmp_path: Path) -> None:
    sample = ROOT / "tests" / "_reference_sample.py"
    sample.write_text(
        "# CONTRACT §4, ../shared/CONTRACT.md, webhooks.md §5, docs/nothing.md,\n"
        "# docs/contract.md §99, docs/contract.md §4, docs/simotel/webhooks.md §5.5\n",
        encoding="utf-8",
    )
    try:
        bad = unresolved(sample)
    finally:
        sample.unlink()
    assert len([b for b in bad if "outside" in b]) == 4
    assert any("docs/nothing.md does not exist" in b for b in bad)
    assert any("docs/contract.md has no section 99" in b for b in bad)
    assert len(bad) == 6
