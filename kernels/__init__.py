"""Triton kernels of fastinpo, installed as the subpackage ``fastinpo.kernels``.

Importing this package must not import Triton: the kernels live in their own modules, loaded by the dispatcher
(:mod:`fastinpo.dispatch`) only when the ``"triton"`` backend is asked for or chosen automatically.
The fused kernels themselves (DPO-family loss forward/backward, the DDIM inversion step) are built by the
kernel issue; until then no op has a ``"triton"`` implementation.
"""
