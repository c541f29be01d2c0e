"""``pip install .`` and ``pip install -e .`` both install ``passes/`` and ``runtime/`` as
``sparsespec_compile.passes`` / ``sparsespec_compile.runtime`` (DESIGN.md: package-dir mapping).

Fast on purpose: no dependency resolution (``--no-deps``), no isolated build env (``--no-build-isolation``: the
test venv already has setuptools), and the imports run in a subprocess from a directory outside the repository
so the checkout itself cannot satisfy them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT_CHECK = (
    "import sparsespec_compile, sparsespec_compile.passes, sparsespec_compile.runtime; "
    "from sparsespec_compile.passes import PassManager; "
    "import sparsespec_compile.testing, sparsespec_compile.serve; "
    "print(sparsespec_compile.__file__); print(sparsespec_compile.passes.__file__); "
    "print(sparsespec_compile.runtime.__file__)"
)


def _run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def _pip_install(python, *args, cwd):
    return _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", *args], cwd=cwd)


def _source_copy(tmp_path: Path) -> Path:
    """The files a source distribution carries, copied out so the build leaves nothing (build/) in the checkout."""
    src = tmp_path / "src"
    keep = ["pyproject.toml", "README.md", "LICENSE", "sparsespec_compile", "passes", "runtime"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in keep:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    return src


def test_regular_install_imports_passes_and_runtime(tmp_path):
    target = tmp_path / "site"
    _pip_install(sys.executable, "--target", str(target), str(_source_copy(tmp_path)), cwd=tmp_path)
    assert not (target / "runtime").exists() and not (target / "passes").exists(), "generic top-level names installed"
    out = _run([sys.executable, "-c", IMPORT_CHECK], cwd=tmp_path, env=_clean_env(PYTHONPATH=str(target)))
    files = out.split()
    assert all(f.startswith(str(target)) for f in files), files  # imported from the install, not the checkout
    assert files[1].endswith(os.path.join("sparsespec_compile", "passes", "__init__.py")), files


def _isolated_venv(tmp_path: Path) -> str:
    """A fresh venv that borrows this venv's packages (torch, setuptools, pip, ...) but not its sparsespec.

    ``--system-site-packages`` would expose the base interpreter, not this venv; instead a ``.pth`` appends a
    folder of symlinks to every package here except sparsespec's own entries (its dist-info and the editable
    finder), so pip sees sparsespec as not installed and the new install is the only way to import it.
    """
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_new = Path(_run([str(python), "-c", purelib], cwd=tmp_path).strip())
    borrowed = tmp_path / "borrowed"
    borrowed.mkdir()
    paths = sysconfig.get_paths()
    for site in {Path(paths["purelib"]), Path(paths["platlib"])}:
        for entry in site.iterdir():
            name = entry.name.lower()
            if name.startswith(("sparsespec", "__editable__", "_sparsespec")) or entry.suffix == ".pth":
                continue
            if not (borrowed / entry.name).exists():
                (borrowed / entry.name).symlink_to(entry)
    (site_new / "_borrowed.pth").write_text(f"import sys; sys.path.append({str(borrowed)!r})\n")
    return str(python)


def test_editable_install_imports_passes_and_runtime(tmp_path):
    python = _isolated_venv(tmp_path)
    # not importable before the install: the check below proves the editable install, not a leak from here
    proc = subprocess.run(
        [python, "-c", "import sparsespec_compile"], cwd=tmp_path, env=_clean_env(), capture_output=True
    )
    assert proc.returncode != 0, "sparsespec_compile importable in the fresh venv before installing it"
    _pip_install(python, "-e", str(REPO), cwd=tmp_path)
    out = _run([python, "-c", IMPORT_CHECK], cwd=tmp_path, env=_clean_env())
    files = out.split()
    assert files[1] == str(REPO / "passes" / "__init__.py"), files  # editable: the checkout's own files
    assert files[2] == str(REPO / "runtime" / "__init__.py"), files
