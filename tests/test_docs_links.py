"""The README and docs/ stay navigable: every relative link resolves, and the README stays short.

Anchors are checked against GitHub's heading slugs (lower case, punctuation dropped, spaces to
hyphens), so a renamed heading breaks its links here rather than on the rendered page.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def prose_lines(text: str, keep_code: bool = False):
    """(line number, line) outside fenced code blocks, inline code removed unless keep_code."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line if keep_code else re.sub(r"`[^`]*`", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8"), keep_code=True):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)))
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


def relative_links(page: Path):
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for match in LINK.finditer(line):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            yield number, target


def test_slug_matches_githubs_rule():
    assert slug("WordNet 3.0 without a download") == "wordnet-30-without-a-download"
    assert slug("The fused op: `megaclass bench ce`") == "the-fused-op-megaclass-bench-ce"
    assert slug("Tensor and data parallel: `ShardedLinearCrossEntropy`") == \
        "tensor-and-data-parallel-shardedlinearcrossentropy"


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [bad](missing.md) `[code](nowhere.md)`\n```\n# not a heading\n"
                    "[fenced](no.md)\n```\n## Top\n## The `op`: x\n")
    assert list(relative_links(page)) == [(3, "#top"), (3, "missing.md")]
    assert anchors(page) == {"top", "top-1", "the-op-x"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for number, target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading with anchor #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it <= {README_MAX_LINES} (move detail to docs/)"
