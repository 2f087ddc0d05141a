"""Packages: ``mtp`` and, when the folder is there, ``kernels/`` installed as ``mtp_kernels``
(a distribution named ``kernels`` already exists on PyPI, so we must not shadow that name).
Deleting ``kernels/`` leaves an installable, working library without the accelerated path."""

from pathlib import Path

from setuptools import setup

HAS_KERNELS = (Path(__file__).parent / "kernels" / "__init__.py").is_file()

setup(
    packages=["mtp", "mtp.demo"] + (["mtp_kernels"] if HAS_KERNELS else []),
    package_dir={"mtp_kernels": "kernels"} if HAS_KERNELS else {},
    # the CUDA source that mtp_kernels.moe_cuda hands to NVRTC at run time
    package_data={"mtp_kernels": ["*.cu"]} if HAS_KERNELS else {},
)
