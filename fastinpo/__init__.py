"""fastinpo: kernel-accelerated preference alignment of text-to-image diffusion models.

Public API (stable; all paired tensors are ``(2B, ...)``, winners first):

- losses: :func:`diffusion_dpo_loss`, :func:`inversion_dpo_loss`, :func:`sft_loss`, :func:`inpo_target`,
  :class:`DiffusionDPOLoss`, :class:`InversionDPOLoss`, :class:`DPOLossOutput`;
- inversion: :func:`ddim_inversion_step`, :func:`inpo_invert`, :func:`inversion_dpo_trajectory`;
- schedule: :class:`NoiseSchedule`, :func:`inpo_grid`, :func:`inversion_dpo_grid`, :func:`inpo_noise_sigma`;
- flow models (SPEC §7): :class:`FlowSchedule`, :func:`sample_flow_sigmas`, :func:`flow_density`,
  :func:`flow_noise`, :func:`flow_target`, :func:`flow_inpo_levels`, :func:`flow_inpo_target`,
  :func:`flow_euler_step`, :func:`flow_inpo_invert` (InPO for flows: fastinpo's extension).

Importing fastinpo needs neither a GPU, nor Triton, nor the compiled extension.
"""

from fastinpo.ops.flow import (
    FlowInPOInversion,
    FlowInPOLevels,
    FlowSchedule,
    FlowTimesteps,
    flow_density,
    flow_euler_step,
    flow_inpo_invert,
    flow_inpo_levels,
    flow_inpo_target,
    flow_noise,
    flow_target,
    sample_flow_sigmas,
)
from fastinpo.ops.inversion import (
    InPOInversion,
    InversionDPOTrajectory,
    ddim_inversion_step,
    inpo_invert,
    inversion_dpo_trajectory,
)
from fastinpo.ops.losses import (
    DiffusionDPOLoss,
    InversionDPOLoss,
    diffusion_dpo_loss,
    inpo_target,
    inversion_dpo_loss,
    sft_loss,
)
from fastinpo.ops.outputs import DPOLossOutput
from fastinpo.ops.schedule import (
    InPOGrid,
    InversionDPOGrid,
    NoiseSchedule,
    inpo_grid,
    inpo_noise_sigma,
    inversion_dpo_grid,
)

__version__ = "0.1.0"

__all__ = [
    "DPOLossOutput",
    "DiffusionDPOLoss",
    "FlowInPOInversion",
    "FlowInPOLevels",
    "FlowSchedule",
    "FlowTimesteps",
    "InPOGrid",
    "InPOInversion",
    "InversionDPOGrid",
    "InversionDPOLoss",
    "InversionDPOTrajectory",
    "NoiseSchedule",
    "__version__",
    "ddim_inversion_step",
    "diffusion_dpo_loss",
    "flow_density",
    "flow_euler_step",
    "flow_inpo_invert",
    "flow_inpo_levels",
    "flow_inpo_target",
    "flow_noise",
    "flow_target",
    "inpo_grid",
    "inpo_invert",
    "inpo_noise_sigma",
    "inpo_target",
    "inversion_dpo_grid",
    "inversion_dpo_loss",
    "inversion_dpo_trajectory",
    "sample_flow_sigmas",
    "sft_loss",
]
