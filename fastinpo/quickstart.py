"""``fastinpo quickstart``: the public API end to end on a tiny SDXL-shaped UNet (random weights, CPU-sized).

It runs what a training step of DDIM-InPO and of Inversion-DPO does — policy inversion with per-pair timesteps,
the reparametrized target, the fused-loss entry point, backward — and prints the numbers. It trains nothing;
``fastinpo demo`` (a later issue) does.
"""

from __future__ import annotations

import copy
import time

import torch

import fastinpo
from fastinpo.models.sd import tiny_cond, tiny_unet_config, unet_callable
from fastinpo.ops.inversion import guided_eps, zero_uncond


def _grad_norm(module: torch.nn.Module) -> float:
    return float(torch.sqrt(sum(p.grad.square().sum() for p in module.parameters() if p.grad is not None)))


def run(pairs: int = 3, seed: int = 0, backend: str | None = None) -> dict:
    from diffusers import UNet2DConditionModel

    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference_unet = UNet2DConditionModel(**tiny_unet_config("sdxl")).eval().requires_grad_(False)
    policy_unet = copy.deepcopy(reference_unet).requires_grad_(True)
    with torch.no_grad():  # a policy a little away from the reference, as after some training
        for p in policy_unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    policy, ref = unet_callable(policy_unet), unet_callable(reference_unet)
    schedule = fastinpo.NoiseSchedule.stable_diffusion()

    z0 = torch.randn(2 * pairs, 4, 16, 16, generator=gen)  # [winners; losers] latents
    cond = tiny_cond("sdxl", 2 * pairs, generator=gen)
    t = torch.randint(0, schedule.num_train_timesteps, (pairs,), generator=gen)
    results: dict = {"pairs": pairs, "t": t.tolist()}

    # DDIM-InPO: invert each pair with the policy up to its own t, regress on the reparametrized target.
    start = time.perf_counter()
    inv = fastinpo.inpo_invert(policy, z0, t, cond, schedule, eta=0.1, generator=gen, backend=backend)
    alpha_t = schedule.alphas_at(t.repeat(2))
    target = fastinpo.inpo_target(inv.latents, z0, alpha_t)
    t2 = t.repeat(2)
    model_pred = policy(inv.latents, t2, cond)
    with torch.no_grad():
        ref_pred = ref(inv.latents, t2, cond)
    out = fastinpo.diffusion_dpo_loss(model_pred, ref_pred, target, beta=5000.0, backend=backend)
    out.loss.backward()
    results["inpo"] = {
        "steps_per_pair": inv.num_steps.tolist(), "end_levels": inv.end_levels.tolist(),
        "model_calls": inv.num_model_calls, "samples_per_call": inv.samples_per_call,
        "loss": float(out.loss.detach()), "implicit_acc": float(out.implicit_acc), "grad_norm": _grad_norm(policy_unet),
        "seconds": time.perf_counter() - start,
    }

    # Inversion-DPO: the reference's guided trajectory, the policy at the same points, the weighted distance.
    policy_unet.zero_grad()
    start = time.perf_counter()
    traj = fastinpo.inversion_dpo_trajectory(ref, z0, cond, schedule, num_steps=8, guidance_scale=2.0,
                                             backend=backend)
    uncond = zero_uncond(cond)
    model_preds = torch.stack([
        guided_eps(policy, traj.latents[i], int(traj.grid.timesteps[i]), cond, uncond, 2.0)
        for i in range(traj.grid.num_steps)
    ])
    out2 = fastinpo.inversion_dpo_loss(model_preds, traj.ref_eps, traj.grid.weights, beta=2000.0, backend=backend)
    out2.loss.backward()
    results["inversion_dpo"] = {
        "steps": traj.grid.num_steps, "loss": float(out2.loss.detach()), "implicit_acc": float(out2.implicit_acc),
        "grad_norm": _grad_norm(policy_unet), "seconds": time.perf_counter() - start,
    }

    print(f"tiny SDXL-shaped UNet ({sum(p.numel() for p in policy_unet.parameters()):,} parameters), "
          f"{pairs} pairs, t = {results['t']}")
    i = results["inpo"]
    print(f"DDIM-InPO     : steps per pair {i['steps_per_pair']}, reached levels {i['end_levels']}, "
          f"{i['model_calls']} policy calls of {i['samples_per_call']} samples")
    print(f"                loss {i['loss']:.6f}  implicit acc {i['implicit_acc']:.3f}  "
          f"grad norm {i['grad_norm']:.4e}  ({i['seconds']:.2f} s)")
    d = results["inversion_dpo"]
    print(f"Inversion-DPO : N = {d['steps']}, loss {d['loss']:.6f}  implicit acc {d['implicit_acc']:.3f}  "
          f"grad norm {d['grad_norm']:.4e}  ({d['seconds']:.2f} s)")
    return results
