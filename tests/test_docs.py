"""README.md and docs/*.md: every relative link points to an existing file, every in-repo anchor
to a heading, the README stays short and shows the two set-up commands (no Ray, no torch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SETUP_COMMANDS = ("bash scripts/demo.sh", "bash scripts/test.sh")


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def _code_free(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path):
    bad = []
    for target in LINK.findall(_code_free(md.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{md.name}: " + "; ".join(bad)


def test_docs_exist():
    names = {p.name for p in DOCS}
    for name in ("engine.md", "service.md", "benchmarks.md", "reliability.md", "deployment.md",
                 "library.md", "layout.md"):
        assert name in names, name


def test_readme_is_short_and_shows_the_two_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    commands = re.findall(r"bash scripts/\S+\.sh", text)
    assert set(commands) == set(SETUP_COMMANDS), commands
    for cmd in SETUP_COMMANDS:
        assert re.search(rf"^{re.escape(cmd)}$", text, flags=re.M), f"{cmd!r} is not on a line of its own"
        assert (ROOT / cmd.split()[1]).is_file()
