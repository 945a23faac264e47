"""Triton kernels of fastinpo, installed as the subpackage ``fastinpo.kernels``.

- :mod:`fastinpo.kernels.dpo_loss`: the fused Diffusion-DPO loss (forward + backward; an InPO variant that forms
  ε* in-kernel);
- :mod:`fastinpo.kernels.inversion_dpo`: the fused Inversion-DPO distance accumulation;
- :mod:`fastinpo.kernels.ddim_step`: the fused DDIM inversion step (table gather, CFG, in-kernel noise, mask);
- :mod:`fastinpo.kernels.flow_step`: the Euler step ``x + Δσ v`` of flow models (SPEC §7), per-sample ``Δσ``;
- :mod:`fastinpo.kernels.registry`: registers them as backend ``"triton"`` with :mod:`fastinpo.ops.dispatch`;
- :mod:`fastinpo.kernels.aot`: compiles every kernel ahead of time for sm_80 / sm_90 (CI, no GPU needed).

Importing this package does not import Triton; the dispatcher loads the registry lazily.
"""
