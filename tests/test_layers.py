"""The layered core, checked on every test run: import-linter's contracts in pyproject.toml (layers
cli > commands > pipeline > resume > recipe schema > stages > libraries > training > context >
building blocks > deploy > registry > errors; no cycles among the children of any package; the
deploy runtime imports neither torch nor the rest of compress)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and out.stdout.count(" KEPT") == 3, out.stdout


def test_plugin_packages_do_not_list_their_plugins():
    """Stages, models, datasets and losses are discovered: their package never imports them by name."""
    assert "register(" in (ROOT / "compress" / "models" / "cifar_resnet.py").read_text()  # the rule sees plugins
    import ast

    for pkg in ("stages", "models", "data", "distill/losses"):
        init = ROOT / "compress" / pkg / "__init__.py"
        # the modules that register something (plugins); support modules (timm building, heads) may be imported
        own = {p.stem for p in init.parent.glob("*.py") if ".register(" in p.read_text()} - {"__init__"}
        dotted = "compress." + pkg.replace("/", ".")
        for node in ast.walk(ast.parse(init.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module.removeprefix(dotted + ".")} | (
                    {a.name for a in node.names} if node.module == dotted else set()
                )
                listed = names & (own - {"base"})
                assert not listed, f"{init} imports {sorted(listed)}: let the registry discover them"
