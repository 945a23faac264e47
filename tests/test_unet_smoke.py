"""A tiny SDXL-shaped diffusers UNet through one DDIM-InPO step and one Inversion-DPO step, end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

import fastinpo
from fastinpo.models.sd import tiny_cond, tiny_unet_config, unet_callable
from fastinpo.ops.inversion import guided_eps, zero_uncond

SD = fastinpo.NoiseSchedule.stable_diffusion()


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**tiny_unet_config("sdxl")).eval().requires_grad_(False)
    policy = copy.deepcopy(ref).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the policy off the reference so the DPO gradients are not trivially zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return policy, ref


def _grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def test_inpo_inversion_loss_backward(unets):
    policy_unet, ref_unet = unets
    policy_unet.zero_grad()
    policy, ref = unet_callable(policy_unet), unet_callable(ref_unet)
    g = torch.Generator().manual_seed(2)
    B = 2
    z0 = torch.randn(2 * B, 4, 16, 16, generator=g)
    cond = tiny_cond("sdxl", 2 * B, generator=g)
    t = torch.tensor([450, 37])
    inv = fastinpo.inpo_invert(policy, z0, t, cond, SD, eta=0.1, generator=g)
    assert inv.num_steps.tolist() == [6, 2] and inv.samples_per_call == [4, 4, 2, 2, 2, 2]
    assert not inv.latents.requires_grad  # the inversion runs without grad
    t2 = t.repeat(2)
    target = fastinpo.inpo_target(inv.latents, z0, SD.alphas_at(t2))
    out = fastinpo.diffusion_dpo_loss(policy(inv.latents, t2, cond), ref(inv.latents, t2, cond), target, 5000.0)
    out.loss.backward()
    grads = _grads(policy_unet)
    assert torch.isfinite(out.loss) and torch.isfinite(grads).all() and grads.abs().max() > 0
    assert all(p.grad is None for p in ref_unet.parameters())


def test_inversion_dpo_loss_backward(unets):
    policy_unet, ref_unet = unets
    policy_unet.zero_grad()
    policy, ref = unet_callable(policy_unet), unet_callable(ref_unet)
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(2, 4, 16, 16, generator=g)
    cond = tiny_cond("sdxl", 2, generator=g)
    traj = fastinpo.inversion_dpo_trajectory(ref, z0, cond, SD, num_steps=4, guidance_scale=2.0)
    uncond = zero_uncond(cond)
    preds = torch.stack([guided_eps(policy, traj.latents[i], int(traj.grid.timesteps[i]), cond, uncond, 2.0)
                         for i in range(4)])
    out = fastinpo.inversion_dpo_loss(preds, traj.ref_eps, traj.grid.weights, 2000.0)
    out.loss.backward()
    grads = _grads(policy_unet)
    assert torch.isfinite(grads).all() and grads.abs().max() > 0
    assert (out.model_mse > 0).all()
