"""The README and docs/: short where they must be, every link and named path real, and every
measured figure written by a benchmark (benchmarks/figures.py), never copied by hand."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIGURES = ROOT / "docs/figures.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 90

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`]+)`")
MAKE = re.compile(r"(?:^|[\s;&(])make ([a-z][\w-]*)")
# Top-level folders of the repository: a `path` in backticks under one of them must exist.
REPO_DIRS = ("src/", "workflow/", "configs/", "benchmarks/", "tests/", "docs/", "profiles/")
PLACEHOLDER = re.compile(r"[<>{}*]|\.\.\.")


def load_figures():
    """benchmarks/figures.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks/figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prose(page: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, '-' for ' '."""
    slugs = set()
    for _, line in prose(page):
        if match := re.match(r"#{1,6} (.+)", line):
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            slugs.add(text.replace(" ", "-"))
    return slugs


def code(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of every code span, and of every line of a fenced code block."""
    found, fenced = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            found.append((number, line))
        else:
            found += [(number, span) for span in CODE_SPAN.findall(line)]
    return found


def where(page: Path, number: int) -> str:
    return f"{page.relative_to(ROOT)}:{number}"


def test_readme_is_a_quick_start():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for number, line in prose(page):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{where(page, number)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{where(page, number)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_repository_path_exists(page):
    missing = []
    for number, span in code(page):
        for word in span.split():
            path = word.strip(",;:()'\"")
            named = path.startswith(REPO_DIRS) and not PLACEHOLDER.search(path)
            if named and not (ROOT / path).exists():
                missing.append(f"{where(page, number)}: {path}")
    assert not missing, "\n".join(missing)


def test_every_make_target_named_exists():
    """Asks make itself (`make -n`: prints the recipe, runs nothing), so pattern and generated
    targets count too."""
    named = {
        name: where(page, number)
        for page in PAGES
        for number, text in code(page)
        for name in MAKE.findall(text)
    }
    unknown = [
        f"{place}: make {name}"
        for name, place in sorted(named.items())
        if subprocess.run(["make", "-n", name], cwd=ROOT, capture_output=True).returncode == 2
    ]
    assert named and not unknown, "not in the Makefile:\n" + "\n".join(unknown)


def test_every_figure_on_the_figures_page_is_generated():
    """Tables and printed output sit inside blocks that a benchmark writes, each block says
    which command made it, and every benchmark that writes a block has one."""
    figures = load_figures()
    page = FIGURES.read_text()
    inside, loose, blocks = None, [], {}
    for number, line in enumerate(page.splitlines(), 1):
        if begin := re.fullmatch(r"<!-- BEGIN GENERATED: ([\w-]+) -->", line):
            inside = begin.group(1)
            blocks[inside] = []
        elif re.fullmatch(r"<!-- END GENERATED: ([\w-]+) -->", line):
            inside = None
        elif inside:
            blocks[inside].append(line)
        elif line.startswith(("|", "```")):
            loose.append(f"docs/figures.md:{number}: {line[:60]}")
    assert not loose, "figures outside a generated block:\n" + "\n".join(loose)

    for name, lines in blocks.items():
        scripts = re.findall(r"`python (benchmarks/\w+\.py)", lines[0])
        assert lines[0].startswith(("Generated by `python ", "Recorded by hand ")), name
        assert scripts and all((ROOT / s).is_file() for s in scripts), f"{name}: {lines[0]}"

    written = {
        name
        for script in (ROOT / "benchmarks").glob("*.py")
        for name in re.findall(r'recorded\("([\w-]+)"\)', script.read_text())
    }
    assert written == set(blocks), f"benchmarks write {written}, the page has {set(blocks)}"
    assert set(figures.BLOCK_NAME.findall(page)) == set(blocks)


def test_a_benchmark_writes_its_block_and_only_on_success(tmp_path, capsys):
    figures = load_figures()
    page = tmp_path / "figures.md"
    text = "# F\n\n<!-- BEGIN GENERATED: one -->\nold\n<!-- END GENERATED: one -->\nafter\n"
    page.write_text(text)

    with pytest.raises(RuntimeError), figures.recorded("one", figures=page):
        print("half a measurement")
        raise RuntimeError("interrupted")
    assert page.read_text() == text

    misspelt = pytest.raises(ValueError, match="no block 'two' \\(blocks: one\\)")
    with misspelt, figures.recorded("two", figures=page):
        pytest.fail("a misspelt block must fail before the measurement")

    with figures.recorded("one", figures=page):
        print("| a | b |")
    written = page.read_text()
    assert "half a measurement" in capsys.readouterr().out  # the terminal still saw it
    assert "old" not in written and written.endswith("<!-- END GENERATED: one -->\nafter\n")
    block = written.split("<!-- BEGIN GENERATED: one -->\n")[1]
    assert block.startswith("Generated by `python ") and " at " in block.splitlines()[0]
    assert "```text\n| a | b |\n```" in block
