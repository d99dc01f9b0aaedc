"""The documents in the repository: their links resolve to files in it, and the architecture
page's parameter counts are the code's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted({*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("bench/**/*.md"),
                    *(ROOT / "qlnas").rglob("*.md")})
LINK = re.compile(r"\]\(([^)\s]+)\)")
PARENT_PATH = re.compile(r"(?<![\w./])(?:\.\./)+[\w./-]+")  # ../x, ../../x, in links or text


def _inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT) and path.exists()


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(doc):
    text = doc.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # a URL or an anchor on this page
            continue
        if not _inside(doc.parent / target.split("#")[0]):
            broken.append(target)
    broken += [path for path in PARENT_PATH.findall(text)
               if not _inside(doc.parent / path.rstrip("."))]  # a full stop ends a sentence
    assert broken == [], f"{doc.relative_to(ROOT)} names files outside the repository or missing"


def test_the_readme_links_the_architecture_page():
    assert "docs/architecture.md" in LINK.findall((ROOT / "README.md").read_text())


def test_architecture_page_counts_are_the_codes():
    """Every `model` | ... | count row of the Table 1 table matches count_params at 100 classes."""
    import timm

    import qlnas  # noqa: F401 - registers the QL-ConvNets
    from qlnas.models.complexity import TABLE1, count_params

    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## 4. Reading Table 1")[1].split("### ")[0]
    stated = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[3].replace(",", "").isdigit():
            for name in re.findall(r"`([\w]+)`", cells[1]):
                stated[name] = int(cells[3].replace(",", ""))
    assert set(stated) == set(TABLE1)
    counted = {name: count_params(timm.create_model(name, num_classes=100)) for name in stated}
    assert stated == counted
