"""The README stays a user's page, and every document the code or the docs cite is in the repository."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CITED = re.compile(r"\b(docs/[A-Za-z0-9_]+\.md)")
SECTION = re.compile(r"docs/omnimol\.md`? ?§§?(\d+)")


def _sources():
    for folder in ("omnimol_jax", "tests", "benchmarks", "configs", "launch", "docs"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".yaml", ".sh", ".md", ".sbatch") and ".venv" not in path.parts:
                yield path
    yield REPO / "README.md"
    yield REPO / "Makefile"


def test_readme_is_a_users_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md"))])
def test_no_commit_hashes_in_user_facing_text(name):
    text = (REPO / name).read_text()
    assert not re.findall(r"\bcommits? [0-9a-f]{7,40}\b", text)


def test_every_cited_document_exists_and_every_cited_section_too():
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", (REPO / "docs" / "omnimol.md").read_text(), re.M)}
    assert sections == set(range(1, 10))
    missing, bad_sections = set(), set()
    for path in _sources():
        text = path.read_text(errors="replace")
        missing |= {(cited, path.name) for cited in CITED.findall(text) if not (REPO / cited).is_file()}
        bad_sections |= {(int(n), path.name) for n in SECTION.findall(text) if int(n) not in sections}
        if path != Path(__file__):
            assert "SPEC" + ".md" not in text, f"{path} cites a SPEC file that is not in the repository"
    assert not missing, sorted(missing)
    assert not bad_sections, sorted(bad_sections)
