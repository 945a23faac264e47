"""Build script for fastinpo.

Metadata lives in pyproject.toml. This file exists for what PEP 621 cannot express:
- the top-level ``kernels/`` folder (Triton kernels) is installed as the subpackage ``fastinpo.kernels``
  (never as a top-level ``kernels`` module, which is another package's import name);
- the optional C++/CUDA extension ``fastinpo._C`` from ``csrc/`` (batched DDIM inversion step).

The extension (install with ``pip install --no-build-isolation -e .``: it builds against the torch already
installed, see scripts/install.sh):
- ``FASTINPO_BUILD_EXT=0`` skips it (``import fastinpo`` works without it; the dispatcher uses the reference);
- otherwise it is built, and a failed compile fails the install loudly (never a silent install without it);
- CPU kernels (``CppExtension``) whenever a C++ compiler is present; with a CUDA torch (``torch.version.cuda``)
  and a CUDA toolkit (``CUDA_HOME``) a ``CUDAExtension`` adds ``csrc/*.cu``. ``FASTINPO_BUILD_CUDA=0`` forces the
  CPU-only build on a CUDA machine;
- CUDA architectures: ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``: A100 and H100/H200);
- parallel compile jobs: ``MAX_JOBS`` (read by torch's ``BuildExtension``).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["fastinpo", "fastinpo.*"]) + ["fastinpo.kernels"]
ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "1") -> bool:
    value = os.environ.get(name, default).strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on", ""):
        return True
    sys.exit(f"setup.py: {name} must be 0 or 1, got {os.environ[name]!r}")


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx) is not None or shutil.which("g++") is not None


def _extensions():
    """``(ext_modules, cmdclass)`` for fastinpo._C, or empty ones when the build is switched off."""
    if not _flag("FASTINPO_BUILD_EXT"):
        print("setup.py: FASTINPO_BUILD_EXT=0: fastinpo._C is not built (the reference backend is used)")
        return [], {}
    if not _have_cxx():
        # No compiler at all is a property of the machine, not a failed build: say so and go on without it.
        print("setup.py: no C++ compiler found (set CXX): fastinpo._C is not built", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:  # pip's build isolation hides the installed torch
        sys.exit(
            f"setup.py: building fastinpo._C needs torch at build time ({err}). Install torch first, then "
            "`pip install --no-build-isolation -e .`, or set FASTINPO_BUILD_EXT=0 to skip the extension."
        )

    cpp_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    cu_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` with torch's OpenMP backend; without the
    # flag it silently runs on one thread. The link resolves to the libgomp.so.1 torch already loaded.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    with_cuda = (
        _flag("FASTINPO_BUILD_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cu_sources)
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"setup.py: building fastinpo._C with CUDA (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = cpp_extension.CUDAExtension(
            "fastinpo._C",
            cpp_sources + cu_sources,
            define_macros=[("FASTINPO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=link_flags,
        )
    else:
        print("setup.py: building fastinpo._C (CPU kernels only: "
              + ("no CUDA torch" if torch.version.cuda is None else "no CUDA toolkit or FASTINPO_BUILD_CUDA=0") + ")")
        ext = cpp_extension.CppExtension(
            "fastinpo._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    # ninja (pip-installed next to this Python) compiles the sources in parallel; BuildExtension looks for it on
    # PATH, which an un-activated venv's pip does not have, and falls back to one-by-one compiles without it.
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")) and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir={"fastinpo.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
