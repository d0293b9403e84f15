"""The documentation stays true: the generated field reference is current, the README stays short,
every relative link resolves, and the README's test command is the one CI runs."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GENERATOR = DOCS / "gen_reference.py"
REFERENCE = DOCS / "reference.md"
MAX_README_LINES = 200

LINKED_PAGES = [README, *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where links are not links."""
    text = re.sub(r"^ *(```|~~~).*?^ *\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text, flags=re.S)


def _links(path: Path) -> list[str]:
    prose = _prose(path.read_text(encoding="utf-8"))
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    refs = re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose, flags=re.M)
    html = re.findall(r"<a\s[^>]*href=\"([^\"]+)\"", prose)
    return inline + refs + html


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for a Markdown file: one per heading (duplicates get -1, -2, ...),
    plus explicit <a id/name=...>."""
    gen = _generator()
    seen: dict[str, int] = {}
    out: set[str] = set()
    text = path.read_text(encoding="utf-8")
    no_fences = re.sub(r"^ *(```|~~~).*?^ *\1[^\n]*$", "", text, flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", no_fences, flags=re.M):
        base = gen.slug(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    out |= set(re.findall(r"<a\s[^>]*(?:id|name)=\"([^\"]+)\"", text))
    return out


# ----------------------------------------------------------------------------- (a) reference


def test_reference_is_current():
    """docs/reference.md is what the generator writes from today's schema."""
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if result.returncode == 1:
        pytest.fail("docs/reference.md is stale: run `python docs/gen_reference.py`", pytrace=False)
    assert result.returncode == 0, f"docs/gen_reference.py --check crashed:\n{result.stderr[-3000:]}"


def test_check_mode_catches_a_stale_file(tmp_path, capsys):
    """--check exits 1 with one line for a stale or missing file and 0 for a current one."""
    gen = _generator()
    current = tmp_path / "reference.md"
    assert gen.main(["--out", str(current)]) == 0
    assert gen.main(["--check", "--out", str(current)]) == 0
    current.write_text(current.read_text(encoding="utf-8").replace("| field |", "| name |", 1), encoding="utf-8")
    capsys.readouterr()
    assert gen.main(["--check", "--out", str(current)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python docs/gen_reference.py" in err
    assert gen.main(["--check", "--out", str(tmp_path / "missing.md")]) == 1


def test_reference_covers_every_registry_and_field():
    """Every stage, dataset, loss term, model and criterion has its entry, and every field of each
    stage (and of every sub-model it holds, recursively) has a row."""
    from compress.data import DATASETS
    from compress.distill import LOSSES
    from compress.importance import IMPORTANCES
    from compress.models import MODELS
    from compress.recipe import recipe_model
    from compress.stages import STAGES

    gen = _generator()
    text = gen.generate()
    for what, registry in (("stage", STAGES), ("dataset", DATASETS), ("loss term", LOSSES)):
        for name, _ in registry.items():
            assert f"### {what} `{name}`" in text, f"{what} {name} missing from the reference"
    for registry in (MODELS, IMPORTANCES):
        for name, _ in registry.items():
            assert f"| `{name}` |" in text
    seen: set[type] = set()
    todo = [recipe_model(), *(cls for _, cls in STAGES.items())]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, field in cls.model_fields.items():
            assert f"| `{field.alias or name}` |" in text, f"{cls.__name__}.{name} has no row"
            todo.extend(gen.models_in(field.annotation))


def test_generator_renders_types_readably():
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field

    gen = _generator()

    class Inner(BaseModel):
        x: int = 1

    cat = gen.Catalog()
    assert gen.render_type(float | None, cat) == "float | None"
    assert gen.render_type(Literal["a", "b"], cat) == "'a' | 'b'"
    assert gen.render_type(list[Annotated[int, Field(gt=0)]], cat) == "list[int (> 0)]"
    assert gen.render_type(list[Inner] | None, cat) == "list[[Inner](#inner)] | None"
    assert cat.nested == [Inner]  # a sub-model mentioned by a field gets its own table


# ----------------------------------------------------------------------------- (b) README length


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/"


# ----------------------------------------------------------------------------- (c) links


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, flags=re.I):  # https:, mailto:, ...
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_link_checker_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[ok](page.md#title) [bad](nope.md) `[code](nope.md)`\n```\n[fenced](nope2.md)\n```\n",
        encoding="utf-8",
    )
    assert _links(page) == ["page.md#title", "nope.md"]
    assert "title" in _anchors(page)


# ----------------------------------------------------------------------------- (d) test command


def _commands(script: str) -> list[str]:
    """Shell commands of a script, one per line, comments and blank lines dropped."""
    out = []
    for line in script.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _ci_test_commands() -> list[str]:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    return [c for c in _commands(ci) if shlex.split(c)[0] == "pytest"]


def _readme_setup_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Set up\s*$(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Set up' section"
    return re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", match.group(1), flags=re.S | re.M)


def test_readme_test_command_is_what_ci_runs():
    ci = _ci_test_commands()
    assert len(ci) == 1, f".ci/run should run pytest exactly once, found {ci}"
    readme = [c for block in _readme_setup_blocks() for c in _commands(block) if shlex.split(c)[0] == "pytest"]
    assert readme == ci, f"README's test command {readme} is not what .ci/run runs ({ci})"


def test_readme_installs_what_ci_installs():
    """Both set up the package the same way: an editable install of the same extras."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = "\n".join(_readme_setup_blocks())
    ci_spec = re.findall(r"pip install (?:--\S+ )*(-e \S+)", ci)
    readme_spec = re.findall(r"pip install (?:--\S+ )*(-e \S+)", readme)
    assert ci_spec and readme_spec == ci_spec, f"README installs {readme_spec}, .ci/run installs {ci_spec}"
