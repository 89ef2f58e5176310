"""The three layers (core `cbir` < services and UI < applications `apps`) hold: import-linter's
contracts in pyproject.toml are kept, and they do catch an upward import."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_layers_and_the_independence_of_the_services_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def copy_of_the_code(tmp_path: Path) -> Path:
    for name in ("apps", "cbir", "services", "ui"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def test_a_core_module_that_imports_a_service_breaks_the_layers(tmp_path):
    root = copy_of_the_code(tmp_path)
    with (root / "cbir" / "errors.py").open("a") as f:
        f.write("\nimport services.indexer.index  # noqa: E402,F401\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "cbir.errors -> services.indexer.index" in result.stdout


def test_a_service_that_imports_another_service_breaks_their_independence(tmp_path):
    root = copy_of_the_code(tmp_path)
    with (root / "services" / "gateway" / "servicer.py").open("a") as f:
        f.write("\nimport services.embedder.images  # noqa: E402,F401\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "services.gateway.servicer -> services.embedder.images" in result.stdout
