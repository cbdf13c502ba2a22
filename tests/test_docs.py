"""The repository stands alone: every doc it cites is in it, and the references page cites its sources."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"docs/[\w./-]+\.(?:md|png|json)")


def _texts() -> dict[Path, str]:
    folders = ("src", "tests", "benchmarks", "docs")
    files = [ROOT / "README.md"] + [p for f in folders for p in (ROOT / f).rglob("*") if p.suffix in (".py", ".md")]
    return {p: p.read_text(encoding="utf-8") for p in files}


def test_every_cited_doc_is_in_the_repository() -> None:
    missing = sorted(
        f"{path.relative_to(ROOT)} cites {cited}"
        for path, text in _texts().items()
        for cited in set(CITED.findall(text))
        if path.name != "test_docs.py" and not (ROOT / cited).is_file()
    )
    assert not missing, missing


def test_references_define_every_citation_key_they_use() -> None:
    text = (ROOT / "docs" / "references.md").read_text(encoding="utf-8")
    body, _, citations = text.partition("## Citations")
    used = set(re.findall(r"\[([A-Z]+)\]", body))
    defined = set(re.findall(r"^- \*\*\[([A-Z]+)\]\*\*", citations, flags=re.M))
    assert used and used <= defined, used - defined
    entries = {re.match(r"\[([A-Z]+)\]", e)[1]: e for e in citations.split("\n- **")[1:]}
    undated = [key for key, entry in entries.items() if key != "TALK" and not re.search(r"\b(19|20)\d\d\b", entry)]
    assert not undated, undated
    assert "../shared" not in text and "/work" not in text
