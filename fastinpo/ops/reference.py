"""The plain-PyTorch reference of every accelerated op (SPEC.md §2–5 and §7).

This module is the single source of truth: the Triton kernels, the C++/CUDA extension, the benchmarks and the
tests all compare against these functions, and nothing re-derives them. Each is written straight from the
formula, accumulates in float32 whatever the input dtype (float64 inputs stay float64, so ``gradcheck`` works),
and does no input validation — the public functions in :mod:`fastinpo.ops.losses` and :mod:`fastinpo.ops.inversion`
validate, then dispatch here (backend ``"reference"``) or to a fast path.

Conventions: paired tensors are ``(2B, ...)`` with winners first, then losers. ``ref_pred`` and ``target`` are
constants of the loss (detached): the loss is differentiable with respect to the policy's predictions only, the
same contract the fused kernels implement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastinpo.ops.outputs import DPOLossOutput


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 if any input is float64."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mse(a, b)``: the per-sample mean over all non-batch dims of ``(a - b)^2``, accumulated in float32.

    Args:
        a, b: ``(n, ...)`` of the same shape, any floating dtype.

    Returns:
        ``(n,)`` float32 (float64 for float64 inputs).
    """
    acc = accumulation_dtype(a.dtype, b.dtype)
    diff = a.to(acc) - b.to(acc)
    return diff.square().flatten(1).mean(1)


#: the preference losses of SPEC §2, as functions of the per-pair logits (``"sigmoid"`` is Diffusion-DPO's)
LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def preference_loss(logits: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """The per-pair loss of SPEC §2 as a function of the logits ``z`` (``(B,)`` in, ``(B,)`` out).

    - ``"sigmoid"``: ``-logsigmoid(z)`` (Diffusion-DPO);
    - ``"hinge"``: ``relu(1 - z)`` (SLiC);
    - ``"ipo"``: ``((z - 1/2) / (beta/2))^2``, i.e. IPO's ``(h - 1/(2 tau))^2`` with ``tau = beta/2`` and
      ``h = z / tau = (r_w - r_l) - (m_w - m_l)``.

    With the diffusers SD1.5 script's ``beta_dpo = beta/2`` these are exactly its three ``--loss_type`` branches.
    """
    if loss_type == "sigmoid":
        return F.softplus(-logits)  # == -logsigmoid(logits), finite for any logits
    if loss_type == "hinge":
        return F.relu(1 - logits)
    if loss_type == "ipo":
        return ((logits - 0.5) / (0.5 * beta)).square()
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of: {', '.join(LOSS_TYPES)}")


def dpo_from_errors(
    model_err: torch.Tensor, ref_err: torch.Tensor, beta: float, sign: float = -1.0, loss_type: str = "sigmoid"
) -> DPOLossOutput:
    """The DPO epilogue shared by Diffusion-DPO and Inversion-DPO.

    ``logits = sign * 0.5 * beta * ((m_w - m_l) - (r_w - r_l))`` with ``sign = -1`` (SPEC §2 and §4),
    ``loss = mean(preference_loss(logits, beta, loss_type))`` (``-logsigmoid`` for ``"sigmoid"``),
    ``implicit_acc = mean(logits > 0) + 0.5 * mean(logits == 0)``.

    Args:
        model_err, ref_err: ``(2B,)`` per-sample errors, winners first.
        beta: the DPO temperature (> 0).
        sign: -1 (SPEC) or +1 (Inversion-DPO's released code, ``flip_sign=True``).
        loss_type: ``"sigmoid"``, ``"hinge"`` or ``"ipo"`` (see :func:`preference_loss`).
    """
    B = model_err.shape[0] // 2
    m_w, m_l = model_err[:B], model_err[B:]
    r_w, r_l = ref_err[:B], ref_err[B:]
    logits = sign * 0.5 * beta * ((m_w - m_l) - (r_w - r_l))
    loss = preference_loss(logits, beta, loss_type).mean()
    acc = (logits > 0).to(logits.dtype).mean() + 0.5 * (logits == 0).to(logits.dtype).mean()
    return DPOLossOutput(loss, logits, model_err, ref_err, acc)


def diffusion_dpo_loss(
    model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float, loss_type: str = "sigmoid"
) -> DPOLossOutput:
    """Diffusion-DPO loss (Wallace et al. 2023; SPEC §2).

    ``m = mse(model_pred, target)``, ``r = mse(ref_pred, target)`` (both ``(2B,)``),
    ``logits = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))``, ``loss = mean(-logsigmoid(logits))`` (or the hinge /
    IPO loss of the logits, :func:`preference_loss`).

    Args:
        model_pred, ref_pred, target: ``(2B, ...)``, winners first; ``ref_pred`` and ``target`` are detached.
        beta: official 5000 (Diffusion-DPO), 2000 / 5000 (InPO SD1.5 / SDXL).
        loss_type: ``"sigmoid"`` (default), ``"hinge"`` or ``"ipo"``.
    """
    target = target.detach()
    m = per_sample_mse(model_pred, target)
    r = per_sample_mse(ref_pred.detach(), target)
    return dpo_from_errors(m, r, beta, loss_type=loss_type)


def inversion_dpo_distance(model_preds: torch.Tensor, ref_preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Inversion-DPO per-sample distance (SPEC §4): ``D = (1/N) Σ_i w_i * mse(model_preds[i], ref_preds[i])``.

    Args:
        model_preds, ref_preds: ``(N, 2B, ...)`` policy and reference ε at the N grid points (ref detached).
        weights: ``(N,)``, ``w_i = 1 / (2 ᾱ_{t_i})``.

    Returns:
        ``(2B,)`` float32 (float64 for float64 inputs).
    """
    N = model_preds.shape[0]
    acc = accumulation_dtype(model_preds.dtype, ref_preds.dtype, weights.dtype)
    diff = model_preds.to(acc) - ref_preds.detach().to(acc)
    per_step = diff.square().flatten(2).mean(2)  # (N, 2B)
    return (weights.detach().to(acc).unsqueeze(1) * per_step).sum(0) / N


def inversion_dpo_loss(
    model_preds: torch.Tensor,
    ref_preds: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    flip_sign: bool = False,
    loss_type: str = "sigmoid",
) -> DPOLossOutput:
    """Inversion-DPO loss (ACM MM 2025; SPEC §4).

    ``D = (1/N) Σ_i w_i mse(model_preds[i], ref_preds[i])`` per sample,
    ``logits = -0.5 * beta * (D_w - D_l)`` (``+`` with ``flip_sign``, the released code's sign),
    ``loss = mean(-logsigmoid(logits))`` (or the hinge / IPO loss of the logits, :func:`preference_loss`).
    ``model_mse`` holds D, ``ref_mse`` zeros.

    Args:
        model_preds, ref_preds: ``(N, 2B, ...)``, winners first along dim 1.
        weights: ``(N,)`` per-step weights ``w_i``.
        beta: official 2000.
        flip_sign: reproduce the released code's ``+0.5 * beta``.
        loss_type: ``"sigmoid"`` (default, the paper's), ``"hinge"`` or ``"ipo"``.
    """
    D = inversion_dpo_distance(model_preds, ref_preds, weights)
    return dpo_from_errors(D, torch.zeros_like(D), beta, sign=1.0 if flip_sign else -1.0, loss_type=loss_type)


def sft_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SFT-on-winners loss (SPEC §5): ``mean(mse(model_pred, target))``, shapes ``(n, ...)``, scalar float32."""
    return per_sample_mse(model_pred, target.detach()).mean()


def inpo_target(x_t: torch.Tensor, z0: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """The reparametrized InPO target (SPEC §3): ``ε* = (x̃ - sqrt(ᾱ_t) z0) / sqrt(1 - ᾱ_t)``.

    Args:
        x_t: ``(n, ...)`` inverted latents ``x̃``.
        z0: ``(n, ...)`` clean latents.
        alpha_t: ``(n,)`` ᾱ of each sample's own sampled ``t``, in (0, 1).

    Returns:
        ``(n, ...)`` float32 (float64 for float64 inputs).
    """
    acc = accumulation_dtype(x_t.dtype, z0.dtype, alpha_t.dtype)
    a = alpha_t.to(acc).view(-1, *([1] * (x_t.dim() - 1)))
    return (x_t.to(acc) - a.sqrt() * z0.to(acc)) / (1 - a).sqrt()


def ddim_inversion_step(
    x: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor
) -> torch.Tensor:
    """One DDIM inversion step (SPEC §3; diffusers ``DDIMInverseScheduler.step``, epsilon, no clipping).

    ``x0 = (x - sqrt(1 - a_from) * eps) / sqrt(a_from)``, ``x_next = sqrt(a_to) * x0 + sqrt(1 - a_to) * eps``,
    computed in float32 (float64 for float64 inputs), in the same order of operations as diffusers.

    Args:
        x, eps: ``(n, ...)`` state and predicted noise.
        alpha_from, alpha_to: ``(n,)`` per-sample ᾱ of the source and target levels, in (0, 1].

    Returns:
        ``x_next`` ``(n, ...)`` in ``x``'s dtype.
    """
    acc = accumulation_dtype(x.dtype, eps.dtype, alpha_from.dtype, alpha_to.dtype)
    shape = (-1, *([1] * (x.dim() - 1)))
    a_from = alpha_from.to(acc).view(shape)
    a_to = alpha_to.to(acc).view(shape)
    e = eps.to(acc)
    x0 = (x.to(acc) - (1 - a_from) ** 0.5 * e) / a_from**0.5
    return (a_to**0.5 * x0 + (1 - a_to) ** 0.5 * e).to(x.dtype)


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``ε_u + g * (ε_c - ε_u)`` in float32 (SPEC §4)."""
    acc = accumulation_dtype(eps_uncond.dtype, eps_cond.dtype)
    u = eps_uncond.to(acc)
    return u + guidance_scale * (eps_cond.to(acc) - u)


def flow_euler_step(x: torch.Tensor, v: torch.Tensor, d_sigma: torch.Tensor) -> torch.Tensor:
    """One Euler step of a rectified-flow ODE ``dx/dσ = v`` (SPEC §7): ``x_next = x + Δσ * v``, float32 math.

    The InPO-for-flows inversion steps from ``g_k`` to ``min(g_{k+1}, σ_t)`` (``Δσ > 0``); a sampler steps down
    (``Δσ < 0``).

    Args:
        x, v: ``(n, ...)`` state and the model's velocity at the source level.
        d_sigma: ``(n,)`` per-sample ``Δσ``.

    Returns:
        ``x_next`` ``(n, ...)`` in ``x``'s dtype.
    """
    acc = accumulation_dtype(x.dtype, v.dtype, d_sigma.dtype)
    d = d_sigma.to(acc).view(-1, *([1] * (x.dim() - 1)))
    return (x.to(acc) + d * v.to(acc)).to(x.dtype)
