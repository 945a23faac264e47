"""Supervised fine-tuning on the winners (SPEC §5)."""

from __future__ import annotations

from fastinpo.methods.base import Method, MethodOutput, Models, StepInputs
from fastinpo.methods.noising import noised_pairs
from fastinpo.ops.inversion import slice_cond
from fastinpo.ops.losses import sft_loss


class SFT(Method):
    name = "sft"
    needs_reference = False

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        B = inputs.num_pairs
        winners = inputs.z0[:B]  # winners come first: the first B rows of every tensor
        x_t, t, target = noised_pairs(winners, self.sample_timesteps(inputs), self.schedule, inputs.rng,
                                      paired=False)
        loss = sft_loss(models.policy(x_t, t, slice_cond(inputs.cond, B)), target)
        return MethodOutput(loss, {"loss": loss.detach(), "model_mse": loss.detach()})
