"""The documentation's relative links: every `[text](path)` and `[text](path#anchor)` in the README and docs/
points at a file of the checkout and, for a Markdown file, at one of its headings (GitHub's anchors)."""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links and code marks dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a Markdown file that lead nowhere (outside code blocks; URLs with a scheme skipped)."""
    out = []
    for link in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):
            continue
        target, _, anchor = link.partition("#")
        dest = path.parent / target if target else path
        if not dest.exists():
            out.append(f"{path.relative_to(root)}: {link} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{path.relative_to(root)}: {link} (no heading with that anchor)")
    return out


def test_every_relative_link_in_the_docs_resolves():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(files) > 10
    assert [b for f in files for b in broken(f)] == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Known gaps: the `reach_cap` (opt-in)\n## Known gaps: the `reach_cap` (opt-in)\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#known-gaps-the-reach_cap-opt-in) [b](other.md#known-gaps-the-reach_cap-opt-in-1) "
                    "[c](https://x.org/y) [d](#top)\n# Top\n```\n[e](not-checked.md)\n```\n"
                    "[f](gone.md) [g](other.md#nowhere)\n")
    assert broken(page, tmp_path) == ["page.md: gone.md (no such file)", "page.md: other.md#nowhere (no heading with that anchor)"]
