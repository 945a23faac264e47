"""The independent baseline of the training-step benchmark (issue 8): one training step of Diffusion-DPO, DDIM-InPO
and Inversion-DPO (and Flow-DPO on SD3) written the way the public training scripts structure it. See
:mod:`.train_step`."""

from benchmarks.reference.train_step import (
    ReferenceModels,
    build_reference_models,
    diffusion_dpo_loss,
    encode_prompt,
    encode_prompt_sd3,
    encode_vae,
    flow_dpo_loss,
    inpo_loss,
    inversion_dpo_loss,
    reference_train_step,
)

__all__ = [
    "ReferenceModels",
    "build_reference_models",
    "diffusion_dpo_loss",
    "encode_prompt",
    "encode_prompt_sd3",
    "encode_vae",
    "flow_dpo_loss",
    "inpo_loss",
    "inversion_dpo_loss",
    "reference_train_step",
]
