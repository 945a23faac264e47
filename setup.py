"""Build script for fastinpo.

Metadata lives in pyproject.toml. This file exists for what PEP 621 cannot express:
- the top-level ``kernels/`` folder (Triton kernels) is installed as the subpackage ``fastinpo.kernels``
  (never as a top-level ``kernels`` module, which is another package's import name);
- the optional C++/CUDA extension ``fastinpo._C`` from ``csrc/`` (added by the extension issue; until then no
  extension is built and ``fastinpo env`` reports it as not built).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["fastinpo", "fastinpo.*"]) + ["fastinpo.kernels"]

setup(
    packages=packages,
    package_dir={"fastinpo.kernels": "kernels"},
)
