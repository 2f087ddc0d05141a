"""Packages: ``mtp`` (with its subpackages) and, when the folder is there, ``kernels/`` installed as
``mtp_kernels`` (a distribution named ``kernels`` already exists on PyPI, so we must not shadow that
name). Deleting ``kernels/`` leaves an installable, working library without the accelerated path.

Every non-Python file a package needs at run time is declared in ``PACKAGE_DATA`` below, and only
here: a ``[tool.setuptools.package-data]`` table in pyproject.toml would silently replace it.
``tests/test_packaging.py`` builds the wheel and checks that every file of the package folders
ships (and fails when a new data file is not declared)."""

from pathlib import Path

from setuptools import find_packages, setup

HAS_KERNELS = (Path(__file__).parent / "kernels" / "__init__.py").is_file()

PACKAGE_DATA = {
    "mtp": ["py.typed"],  # PEP 561: the package's annotations are for type checkers
    # the demo's trained pair (release-format shards, ~5.4 MiB) and its held-out prompts
    "mtp.demo": ["data/*.json", "data/tiny_pair/*"],
    # the CUDA source that mtp_kernels.moe_cuda hands to NVRTC at run time
    "mtp_kernels": ["*.cu"],
}

setup(
    packages=find_packages(include=["mtp", "mtp.*"])
    + (["mtp_kernels"] if HAS_KERNELS else []),
    package_dir={"mtp_kernels": "kernels"} if HAS_KERNELS else {},
    package_data={k: v for k, v in PACKAGE_DATA.items() if HAS_KERNELS or k != "mtp_kernels"},
    include_package_data=False,  # exactly what PACKAGE_DATA declares, nothing from MANIFEST/git
)
