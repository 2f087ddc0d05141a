"""The repository and its wheel: the built wheel ships every file the packages need at run time
(a non-editable install must work, not only ``pip install -e``), every module it imports is one
it declares, and nothing tracked names a path outside the repository (a fresh clone anywhere must
pass its tests)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the import name it is installed as (setup.py's package_dir)
PACKAGE_DIRS = {"mtp": "mtp", "kernels": "mtp_kernels"}
# files inside the package folders that are deliberately NOT installed (developer notes)
NOT_SHIPPED = {"kernels/NOTES.md"}
_JUNK = ("__pycache__", ".pyc", ".pyo")


def _package_files() -> set[str]:
    """Every file of the package folders, as its path inside the wheel."""
    out = set()
    for src, dst in PACKAGE_DIRS.items():
        for p in (ROOT / src).rglob("*"):
            rel = p.relative_to(ROOT).as_posix()
            if p.is_file() and not any(j in rel for j in _JUNK) and rel not in NOT_SHIPPED:
                out.add(dst + rel[len(src):])
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """Build the wheel as a user does (``pip wheel``) from a copy of the sources: the build writes
    ``build/`` and ``*.egg-info`` next to the sources, which must not land in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for p in ROOT.iterdir():  # the top-level files (pyproject.toml, setup.py, README.md, ...)
        if p.is_file():
            shutil.copy2(p, src / p.name)
    for d in PACKAGE_DIRS:
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns(*_JUNK))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    (path,) = (tmp / "dist").glob("mtp-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


def test_wheel_ships_every_package_file(wheel):
    names = set(wheel.namelist())
    # the two that went missing or matter most, named so a failure reads plainly
    assert "mtp_kernels/moe_fp4.cu" in names  # NVRTC compiles it at the first GPU draft step
    assert "mtp/py.typed" in names
    # and every other file of the package folders: a data file added without declaring it in
    # setup.py's PACKAGE_DATA fails here (or add it to NOT_SHIPPED if it must not ship)
    missing = _package_files() - names
    assert not missing, f"not in the wheel (declare them in setup.py's PACKAGE_DATA): {missing}"
    tops = {n.split("/")[0] for n in names}
    assert tops - set(PACKAGE_DIRS.values()) == {"mtp-0.1.0.dist-info"}, tops  # and nothing else
    extra = {n for n in names if n.split("/")[0] in PACKAGE_DIRS.values()} - _package_files()
    assert not extra, f"the wheel ships files the sources do not have: {extra}"


def test_wheel_installs_the_kernel_source_where_the_kernel_looks(wheel, tmp_path):
    """The installed ``mtp_kernels/moe_cuda.py`` finds its ``.cu`` next to itself. Loaded alone
    (the package's ``__init__`` needs Triton, absent on CPU machines): its module-level code only
    computes the path."""
    wheel.extractall(tmp_path)  # what `pip install mtp-*.whl` puts in site-packages
    spec = importlib.util.spec_from_file_location("_wheel_moe_cuda",
                                                  tmp_path / "mtp_kernels" / "moe_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SOURCE.parent == tmp_path / "mtp_kernels"
    assert module.SOURCE.is_file(), module.SOURCE


# ---- nothing in the repository names a path outside it ---------------------------------------
# absolute paths of one machine (written as classes so this file does not match itself)
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:[w]ork|[f]arm|[h]ome|[r]oot|[U]sers|[m]nt)/"
                          r"|\.\.[/\\][s]hared")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
        return [ROOT / f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every source file
        skip = {".git", ".venv", "venv", "build", "dist", ".hypothesis", ".pytest_cache",
                ".ruff_cache", "__pycache__", ".dev", "out"}
        return [p for p in ROOT.rglob("*") if p.is_file()
                and not skip.intersection(p.relative_to(ROOT).parts)]


def test_no_tracked_file_names_a_path_outside_the_repository():
    hits = []
    for p in _tracked_files():
        if not p.is_file():  # deleted in the working tree, not yet committed
            continue
        data = p.read_bytes()
        if p.suffix == ".gz":
            import gzip

            data = gzip.decompress(data)
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_machine_path_pattern_catches_what_it_must():  # the grep above cannot pass vacuously
    for bad in ("SPEC = Path('/" + "work/shared/spec')", "see ../" + "shared/x", "/" + "farm/a",
                "open('/" + "home/me/x')"):
        assert MACHINE_PATH.search(bad), bad
    for fine in ("https://github.com/a/b", "python benchmarks/bench_load.py --dir /tmp/bench",
                 "tests/data/tensors-flash.json.gz", "~/.cache/huggingface/hub"):
        assert not MACHINE_PATH.search(fine), fine


# third-party modules mtp imports without declaring them, each with why that is right: only
# inside ``try`` / ``except ImportError`` or behind an extra
OPTIONAL_IMPORTS = {
    "tqdm": "the loading bar; imported under try/except ImportError (huggingface_hub brings it)",
    "transformers": "mtp.integrations.transformers: the [transformers] extra",
    "mtp_kernels": "this repository's kernels/, in the same wheel; imported where asked for",
}


def _imported_modules(source: str) -> set[str]:
    """Top-level names of the absolute imports in ``source``."""
    import ast
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _declared_dependencies() -> set[str]:
    """The import names of pyproject.toml's runtime dependencies (each is its own import
    name: torch, safetensors, numpy, huggingface_hub, einops)."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.10 has no tomllib (3.11+)")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].replace("-", "_") for d in deps}


def test_every_module_mtp_imports_is_declared():
    """A third-party module ``mtp`` imports is a runtime dependency of its own, not one that
    happens to come with another (numpy came with safetensors[torch] until it was named), or
    is listed in OPTIONAL_IMPORTS with the reason its absence is handled."""
    declared = _declared_dependencies()
    found: dict[str, list[str]] = {}
    for p in sorted((ROOT / "mtp").rglob("*.py")):
        for mod in _imported_modules(p.read_text()):
            if mod not in sys.stdlib_module_names and mod != "mtp":
                found.setdefault(mod, []).append(p.relative_to(ROOT).as_posix())
    undeclared = {m: files for m, files in found.items()
                  if m not in declared and m not in OPTIONAL_IMPORTS}
    assert not undeclared, f"imported by mtp, not in pyproject.toml's dependencies: {undeclared}"
    assert {"torch", "safetensors", "numpy"} <= set(found)  # (the scan sees real imports)
    assert not set(OPTIONAL_IMPORTS) - set(found), "OPTIONAL_IMPORTS lists a module not imported"
