"""One training step of Diffusion-DPO, DDIM-InPO and Inversion-DPO — and of Flow-DPO on SD3 flow models — written
the way the public training scripts structure it: the baseline fastinpo's training step is measured against
(issue 8; Flow-DPO: issue 19).

It computes the math of SPEC.md (same objective, same conventions) but keeps the scripts' structure, which is what
the benchmark exists to compare with:

- the VAE and the text encoders run in every step, from pixels and captions (a fresh posterior sample; caption
  dropout replaces the caption string by "" before encoding), as the diffusers DPO examples and the InPO and
  Inversion-DPO scripts do;
- the losses are plain eager PyTorch, written like the scripts (``F.mse_loss(..., reduction="none")``, ``chunk(2)``,
  ``-F.logsigmoid``), no fused kernels;
- Diffusion-DPO: one policy call and one reference call on ``[winners; losers]`` (the scripts concatenate too);
- DDIM-InPO: the policy inversion makes one model call per grid step over the WHOLE batch and stops where the
  official script stops: it inverts only through the levels below the pair's ``t`` (``timesteps < t``; about 6.4
  calls on average at K = 10, not all 10). With B > 1 pairs it runs up to the largest ``t`` of the batch and masks
  the update of samples whose pair is already done (the official code takes the first pair's ``t`` for the whole
  batch, which is not the same math; this is the correct whole-batch version of its structure). No prefix
  batching: every call is on all 2B samples;
- Inversion-DPO: winners and losers are inverted separately (separate model calls, as the released code calls its
  ``ddim_inversion`` once per image), each call batching the two CFG halves like the released
  ``_get_noise_pred_unet``: per image N no-grad reference calls along the trajectory, then N policy calls at its
  points (4N UNet calls of 2 rows per pair); all N policy evaluations stay in one autograd graph and one
  ``backward``. (The released code also re-encodes the prompt and the empty prompt inside every ``ddim_inversion``
  call; this step encodes once per step, so it is, if anything, faster than the released structure.)
- Flow-DPO (SD3 / SD3.5, SPEC §7) as the public SD3 DPO trainers and the diffusers SD3 training examples structure
  it: the VAE latents ``(mean-free posterior sample - shift_factor) * scaling_factor`` and ``encode_prompt`` (CLIP-L
  and CLIP-G penultimate states, zero-padded to the T5 width, T5 part zeros without T5; pooled = both projections)
  every step; ``noisy = (1 - σ) z0 + σ ε`` with ``σ`` looked up per pair and the timestep ``σ · T``; target
  ``ε - z0``; one transformer call for the policy and a separate one for the reference on ``[winners; losers]``;
  the diffusers DPO loss on velocities (constant β);
- the frozen reference UNet is a copy in ``ref_dtype`` (the scripts: fp16 for InPO and Diffusion-DPO, bf16 for
  Inversion-DPO); in LoRA mode the reference is the policy with its adapters disabled (diffusers' LoRA DPO
  example).

Where the scripts deviate from SPEC.md this file follows SPEC (so the numbers can be checked against fastinpo):
float32 ᾱ tables and inversion states, timesteps passed as integers (never rounded through a bf16 cast), per-pair
``t`` everywhere, the paper's sign for Inversion-DPO (``flip_sign`` gives the released one), per-sample MSE for
``B > 1`` pairs. It imports the schedule arithmetic (ᾱ table, grids) from :mod:`fastinpo.ops.schedule` and nothing
else of fastinpo: the losses, the inversion loops and the step are written here, independently.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fastinpo.ops.schedule import NoiseSchedule, inpo_grid, inversion_dpo_grid


@dataclass
class ReferenceModels:
    """What the reference step uses.

    Attributes:
        unet: the policy UNet, float32 weights (with peft adapters in LoRA mode).
        ref_unet: the frozen reference copy in ``ref_dtype``; ``None`` in LoRA mode.
        schedule: the model's :class:`NoiseSchedule` (ᾱ table).
        ref_dtype: dtype of the reference UNet and of its inputs.
        amp_dtype: autocast dtype of the policy forward (``None``: float32, no autocast).
        vae, text_encoders, tokenizers, arch: the encoders run in every step (``None`` / empty when only the
            loss functions are used, as in the numerical test).
        optimizer: AdamW over the trainable parameters (``None``: :func:`reference_train_step` is not used).
    """

    unet: Any
    ref_unet: Any | None
    schedule: NoiseSchedule
    ref_dtype: torch.dtype = torch.float16
    amp_dtype: torch.dtype | None = None
    vae: Any | None = None
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    arch: str = "sdxl"
    optimizer: torch.optim.Optimizer | None = None

    @property
    def flow(self) -> bool:
        """An SD3 transformer (velocity prediction, flow matching) rather than a UNet."""
        return self.arch == "sd3"

    @property
    def lora(self) -> bool:
        return self.ref_unet is None

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]


def build_reference_models(policy_unet, schedule: NoiseSchedule, *, ref_unet=None, lora: bool = False,
                           ref_dtype: torch.dtype = torch.float16, amp_dtype: torch.dtype | None = None,
                           vae=None, text_encoders=(), tokenizers=(), arch: str = "sdxl", lr: float | None = 1e-5,
                           gradient_checkpointing: bool = False) -> ReferenceModels:
    """Wrap a float32 policy UNet (already holding its adapters in LoRA mode) and, in full mode, the frozen
    reference copy (cast to ``ref_dtype`` here). ``lr=None`` builds no optimizer."""
    if not lora:
        if ref_unet is None:
            raise ValueError("full fine-tuning needs the frozen reference UNet (ref_unet)")
        ref_unet = ref_unet.to(ref_dtype).requires_grad_(False).eval()
    else:
        ref_unet = None
    if gradient_checkpointing:
        policy_unet.enable_gradient_checkpointing()
    policy_unet.train()
    for module in (vae, *text_encoders):
        if module is not None:
            module.requires_grad_(False).eval()
    models = ReferenceModels(policy_unet, ref_unet, schedule, ref_dtype, amp_dtype, vae, list(text_encoders),
                             list(tokenizers), arch)
    if lr is not None:
        # plain AdamW as the scripts build it (no fused / foreach choice of ours)
        models.optimizer = torch.optim.AdamW(models.trainable, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    return models


# ----------------------------------------------------------------------------------------------- model calls
def _added(cond: dict, dtype: torch.dtype) -> dict | None:
    added = {k: cond[k].to(dtype) for k in ("text_embeds", "time_ids") if k in cond}
    return added or None


def _call(module, x: torch.Tensor, t: torch.Tensor, cond: dict, dtype: torch.dtype) -> torch.Tensor:
    """One denoiser call with its inputs in ``dtype``: a UNet (``added_cond_kwargs`` for SDXL), or an SD3
    transformer (``pooled_projections``), as the scripts call them."""
    if "pooled_projections" in cond:
        return module(hidden_states=x.to(dtype), timestep=t,
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      pooled_projections=cond["pooled_projections"].to(dtype)).sample
    return module(x.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                  added_cond_kwargs=_added(cond, dtype)).sample


def policy_pred(models: ReferenceModels, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The policy's ε (SD3: velocity) (float32 weights, autocast when ``amp_dtype`` is set, as accelerate's mixed
    precision)."""
    ctx = torch.autocast(x.device.type, dtype=models.amp_dtype) if models.amp_dtype is not None else nullcontext()
    with ctx:
        return _call(models.unet, x, t, cond, torch.float32)


def reference_pred(models: ReferenceModels, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The frozen reference's ε: the ``ref_dtype`` copy, or the policy with its adapters disabled (LoRA)."""
    if models.lora:
        models.unet.disable_adapters()
        try:
            return _call(models.unet, x, t, cond, torch.float32)
        finally:
            models.unet.enable_adapters()
    return _call(models.ref_unet, x, t, cond, models.ref_dtype)


# ----------------------------------------------------------------------------------------------- encoders
@torch.no_grad()
def encode_vae(models: ReferenceModels, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``vae.encode(pixels).latent_dist.sample() * scaling_factor`` — a fresh posterior sample, every step (SD3:
    ``(sample - shift_factor) * scaling_factor``)."""
    vae = models.vae
    dtype = next(vae.parameters()).dtype
    latents = vae.encode(pixels.to(dtype)).latent_dist.sample(generator=generator)
    shift = (vae.config.shift_factor or 0.0) if models.flow else 0.0
    return (latents.float() - shift) * vae.config.scaling_factor


@torch.no_grad()
def encode_prompt(models: ReferenceModels, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The diffusers DPO examples' ``encode_prompt``: SD1.5 ``text_encoder(ids)[0]``; SDXL the penultimate hidden
    states of both encoders concatenated and encoder 2's projected pooled output."""
    if models.flow:
        return encode_prompt_sd3(models, captions)
    embeds, pooled = [], None
    device = next(models.text_encoders[0].parameters()).device
    for tokenizer, text_encoder in zip(models.tokenizers, models.text_encoders, strict=True):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        if models.arch == "sd15":
            embeds.append(text_encoder(ids)[0])
        else:
            out = text_encoder(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1).float(), (None if pooled is None else pooled.float())


@torch.no_grad()
def encode_prompt_sd3(models: ReferenceModels, captions: list[str], max_sequence_length: int = 256,
                      joint_attention_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``StableDiffusion3Pipeline.encode_prompt`` as the SD3 training scripts call it (no CFG, no clip skip): CLIP-L
    and CLIP-G penultimate hidden states concatenated, zero-padded to the T5 width and concatenated with the T5
    sequence — zeros of ``(max_sequence_length, joint_attention_dim)`` without T5 —, pooled = both projections."""
    device = next(models.text_encoders[0].parameters()).device
    clip_embeds, pooled = [], []
    for tokenizer, text_encoder in zip(models.tokenizers[:2], models.text_encoders[:2], strict=True):
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = text_encoder(ids, output_hidden_states=True)
        pooled.append(out[0])
        clip_embeds.append(out.hidden_states[-2])
    clip = torch.cat(clip_embeds, dim=-1)
    if len(models.text_encoders) > 2:
        ids = models.tokenizers[2](captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        t5 = models.text_encoders[2](ids)[0]
    else:
        width = joint_attention_dim or models.unet.config.joint_attention_dim
        t5 = torch.zeros(len(captions), max_sequence_length, width, device=device, dtype=clip.dtype)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2).float(), torch.cat(pooled, dim=-1).float()


def make_cond(prompt_embeds: torch.Tensor, pooled: torch.Tensor | None, time_ids: torch.Tensor | None,
              arch: str = "sdxl") -> dict:
    """Denoiser conditioning for ``[winners; losers]`` (each pair's caption repeated for both images)."""
    cond = {"encoder_hidden_states": prompt_embeds.repeat(2, 1, 1)}
    if arch == "sd3":
        cond["pooled_projections"] = pooled.repeat(2, 1)
        return cond
    if pooled is not None:
        cond["text_embeds"] = pooled.repeat(2, 1)
        cond["time_ids"] = time_ids
    return cond


# ----------------------------------------------------------------------------------------------- losses
@dataclass
class LossOut:
    loss: torch.Tensor
    logits: torch.Tensor
    model_err: torch.Tensor
    ref_err: torch.Tensor


def _alphas(models: ReferenceModels, device) -> torch.Tensor:
    return models.schedule.alphas_cumprod.to(device)


def diffusion_dpo_loss(models: ReferenceModels, z0: torch.Tensor, cond: dict, t: torch.Tensor, noise: torch.Tensor,
                       beta: float) -> LossOut:
    """Diffusion-DPO (SPEC §2) as the diffusers DPO example writes it. ``t`` ``(B,)``, ``noise`` ``(B, ...)``:
    the same ε and t for the two images of a pair."""
    alphas = _alphas(models, z0.device)
    timesteps = t.to(z0.device).repeat(2)
    noise = noise.repeat(2, 1, 1, 1)
    a = alphas[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise  # noise_scheduler.add_noise
    return dpo_on(models, noisy, timesteps, cond, noise, beta)


def flow_dpo_loss(models: ReferenceModels, z0: torch.Tensor, cond: dict, sigma: torch.Tensor, noise: torch.Tensor,
                  beta: float, num_train_timesteps: int = 1000) -> LossOut:
    """Flow-DPO (SPEC §7) as the public SD3 DPO code writes it: ``sigma`` ``(B,)`` (one per pair, looked up in the
    scheduler's training table by the caller), ``noise`` ``(B, ...)``: the same σ and ε for both images of a pair;
    ``noisy = (1 - σ) z0 + σ ε``, timestep ``σ · T``, target ``ε - z0``, then the diffusers DPO loss."""
    sigmas = sigma.to(z0.device, torch.float32).repeat(2)
    noise = noise.repeat(2, 1, 1, 1)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * z0 + s * noise
    timesteps = sigmas * num_train_timesteps
    target = noise - z0
    return dpo_on(models, noisy, timesteps, cond, target, beta)


def dpo_on(models: ReferenceModels, x: torch.Tensor, timesteps: torch.Tensor, cond: dict, target: torch.Tensor,
           beta: float) -> LossOut:
    """The diffusers DPO example's loss of policy and reference at ``x`` against ``target`` (Diffusion-DPO's
    noise; InPO's ε*, as the InPO script reuses this code)."""
    model_pred = policy_pred(models, x, timesteps, cond)
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_pred = reference_pred(models, x, timesteps, cond)
        ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none")
        ref_losses = ref_losses.mean(dim=list(range(1, len(ref_losses.shape))))
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta
    inside_term = scale_term * (model_diff - ref_diff)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return LossOut(loss, inside_term.detach(), model_losses.detach(), ref_losses)


def _ddim_next(x: torch.Tensor, eps: torch.Tensor, alpha_prod_t, alpha_prod_t_next) -> torch.Tensor:
    """The released Inversion-DPO ``_next_step_scheduler`` / diffusers 0.20 ``DDIMInverseScheduler.step``."""
    beta_prod_t = 1 - alpha_prod_t
    next_original_sample = (x - beta_prod_t**0.5 * eps) / alpha_prod_t**0.5
    next_sample_direction = (1 - alpha_prod_t_next) ** 0.5 * eps
    return alpha_prod_t_next**0.5 * next_original_sample + next_sample_direction


def _alpha_at(models: ReferenceModels, alphas: torch.Tensor, level: int) -> torch.Tensor:
    # a negative level is the extra start level below 0: ᾱ_init (final_alpha_cumprod), float32
    if level >= 0:
        return alphas[level]
    return torch.tensor(models.schedule.alpha_init, dtype=torch.float32, device=alphas.device)


def inpo_invert_whole_batch(models: ReferenceModels, z0: torch.Tensor, t: torch.Tensor, cond: dict, *,
                            num_levels: int = 10, eta: float = 0.0,
                            generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """DDIM-InPO policy inversion (SPEC §3), one model call per grid step over the whole batch.

    The grid steps whose source level is below the batch's largest ``t`` run (the official script's
    ``timesteps < t``: B = 1 inverts exactly up to its pair's ``t``, and stops there); each calls the policy on all
    ``2B`` samples, and a sample whose pair has already reached its level keeps its state (``torch.where``).
    η > 0 adds ``η σ n`` with ``n`` drawn per sample — from ``generators`` (one per sample, winners then losers)
    when given, so a test can feed the same noise as fastinpo; a sample draws at every step that runs, but the
    draws after its last active step are never used.
    """
    grid = inpo_grid(models.schedule, num_levels)
    alphas = _alphas(models, z0.device)
    t2 = t.to(z0.device).repeat(2)
    x = z0.detach().float().clone()
    n = x.shape[0]
    t_max = int(t2.max())  # one host read per step, as the official script's python-side `t` loop bound
    with torch.no_grad():
        for k in range(grid.num_levels):
            src, dst = int(grid.source_levels[k]), int(grid.levels[k])
            if src >= t_max:  # no pair of the batch inverts past here: the official loop has ended
                break
            active = (src < t2).view(-1, 1, 1, 1)
            timesteps = torch.full((n,), src, dtype=torch.int64, device=x.device)
            eps = policy_pred(models, x, timesteps, cond).float()
            a_from, a_to = _alpha_at(models, alphas, src), alphas[dst]
            x_next = _ddim_next(x, eps, a_from, a_to)
            if eta > 0:
                sigma = (((1 - a_from) / (1 - a_to)) * (1 - a_to / a_from)).clamp(min=0).sqrt()
                if generators is not None:
                    noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generators])
                else:
                    noise = torch.randn_like(x)
                x_next = x_next + eta * sigma * noise
            x = torch.where(active, x_next, x)
    return x


def inpo_loss(models: ReferenceModels, z0: torch.Tensor, cond: dict, t: torch.Tensor, beta: float, *,
              num_levels: int = 10, eta: float = 0.0, generators: list[torch.Generator] | None = None) -> LossOut:
    """DDIM-InPO (SPEC §3): invert with the policy, ε* from the pair's sampled ``t``, then Diffusion-DPO."""
    x_inv = inpo_invert_whole_batch(models, z0, t, cond, num_levels=num_levels, eta=eta, generators=generators)
    alphas = _alphas(models, z0.device)
    timesteps = t.to(z0.device).repeat(2)
    a = alphas[timesteps].view(-1, 1, 1, 1)
    target = (x_inv - a.sqrt() * z0) / (1 - a).sqrt()  # float32 ᾱ (the official fp16 table is off at small t)
    return dpo_on(models, x_inv, timesteps, cond, target, beta)


def _cfg_pred(pred_fn, models, latent, t: int, context: dict, guidance_scale: float) -> torch.Tensor:
    """The released ``_get_noise_pred_unet``: one call on ``[latent; latent]`` with ``[uncond; cond]``."""
    latents_input = torch.cat([latent] * 2)
    timesteps = torch.full((latents_input.shape[0],), t, dtype=torch.int64, device=latent.device)
    noise_pred = pred_fn(models, latents_input, timesteps, context).float()
    noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
    return noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)


def _ddim_inversion(models: ReferenceModels, z0: torch.Tensor, context: dict, num_steps: int,
                    guidance_scale: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One image group's reference trajectory (no grad) and the policy's ε at its points (in the graph)."""
    grid = inversion_dpo_grid(models.schedule, num_steps)
    alphas = _alphas(models, z0.device)
    latents = [z0]
    noise_preds_ref = []
    latent = z0.clone()
    with torch.no_grad():
        for i in range(num_steps):
            t = int(grid.timesteps[i])
            noise_pred = _cfg_pred(reference_pred, models, latent, t, context, guidance_scale)
            noise_preds_ref.append(noise_pred)
            # from level t - T//N (ᾱ_init below 0) to level t: ε evaluated at the target level, as released
            latent = _ddim_next(latent, noise_pred, _alpha_at(models, alphas, t - grid.stride), alphas[t])
            latents.append(latent)
    noise_preds = []
    for i in range(num_steps):
        noise_preds.append(_cfg_pred(policy_pred, models, latents[i], int(grid.timesteps[i]), context,
                                     guidance_scale))
    return noise_preds, noise_preds_ref


def inversion_dpo_loss(models: ReferenceModels, z0: torch.Tensor, cond: dict, beta: float, *, num_steps: int = 40,
                       guidance_scale: float = 2.0, flip_sign: bool = False) -> LossOut:
    """Inversion-DPO (SPEC §4) as the released code structures it: winners and losers inverted separately, the
    unconditional branch all-zero embeddings with the same ``time_ids``, every policy ε kept in the graph."""
    B = z0.shape[0] // 2
    grid = inversion_dpo_grid(models.schedule, num_steps)
    alphas = _alphas(models, z0.device)

    def context(rows: slice) -> dict:
        c = {k: v[rows] for k, v in cond.items()}
        u = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in c.items()}
        return {k: torch.cat([u[k], c[k]]) for k in c}

    e_win_theta, e_win_ref = _ddim_inversion(models, z0[:B], context(slice(0, B)), num_steps, guidance_scale)
    e_lose_theta, e_lose_ref = _ddim_inversion(models, z0[B:], context(slice(B, 2 * B)), num_steps, guidance_scale)
    win_total_diff = 0.0
    lose_total_diff = 0.0
    for t_idx in range(num_steps):
        alpha_t_current = alphas[int(grid.timesteps[t_idx])]
        weight = (1 - alpha_t_current) / (2 * (1 - alpha_t_current) * alpha_t_current)  # = 1 / (2 ᾱ_t)
        eps_diff_win = ((e_win_theta[t_idx] - e_win_ref[t_idx]) ** 2).mean(dim=(1, 2, 3))
        eps_diff_lose = ((e_lose_theta[t_idx] - e_lose_ref[t_idx]) ** 2).mean(dim=(1, 2, 3))
        win_total_diff = win_total_diff + weight * eps_diff_win
        lose_total_diff = lose_total_diff + weight * eps_diff_lose
    diff = (win_total_diff - lose_total_diff) / num_steps
    inside_term = (0.5 if flip_sign else -0.5) * diff * beta  # the paper's sign unless flip_sign (released)
    loss = -1 * F.logsigmoid(inside_term).mean()
    D = torch.cat([win_total_diff, lose_total_diff]).detach() / num_steps
    return LossOut(loss, inside_term.detach(), D, torch.zeros_like(D))


# ----------------------------------------------------------------------------------------------- the step
def reference_train_step(models: ReferenceModels, method: str, pixels: torch.Tensor, captions: list[str],
                         time_ids: torch.Tensor | None, *, t: torch.Tensor, noise: torch.Tensor | None = None,
                         inversion_generators: list[torch.Generator] | None = None,
                         generator: torch.Generator | None = None, caption_dropout: float = 0.0,
                         beta: float = 5000.0, num_levels: int = 10, eta: float = 0.1, num_steps: int = 40,
                         guidance_scale: float = 2.0, flip_sign: bool = False,
                         max_grad_norm: float = 1.0) -> torch.Tensor:
    """One optimizer step from pixels ``(2B, 3, R, R)`` (winners first) and B captions.

    ``t`` ``(B,)`` (SD3: each pair's σ, a float in (0, 1]) and ``noise`` ``(B, C, h, w)`` are given by the caller
    (the benchmark hands both implementations the same per-pair draws, so they do the same work); ``generator``
    drives the VAE posterior sample and caption dropout. Returns the (detached) loss.
    """
    device = pixels.device
    if caption_dropout > 0:  # the scripts' `random.random() < proportion_empty_prompts`, one draw per pair
        drop = torch.rand(len(captions), generator=generator, device="cpu" if generator is None else
                          generator.device).tolist()
        captions = ["" if d < caption_dropout else c for d, c in zip(drop, captions, strict=True)]
    z0 = encode_vae(models, pixels, generator)
    prompt_embeds, pooled = encode_prompt(models, captions)
    cond = make_cond(prompt_embeds.to(device), None if pooled is None else pooled.to(device), time_ids, models.arch)
    if models.flow:
        if method != "diffusion-dpo":
            raise ValueError(f"the reference implements Flow-DPO (diffusion-dpo) on SD3, not {method!r}")
        out = flow_dpo_loss(models, z0, cond, t, noise, beta)
    elif method == "diffusion-dpo":
        out = diffusion_dpo_loss(models, z0, cond, t, noise, beta)
    elif method == "inpo":
        out = inpo_loss(models, z0, cond, t, beta, num_levels=num_levels, eta=eta, generators=inversion_generators)
    elif method == "inversion-dpo":
        out = inversion_dpo_loss(models, z0, cond, beta, num_steps=num_steps, guidance_scale=guidance_scale,
                                 flip_sign=flip_sign)
    else:
        raise ValueError(f"the reference implements diffusion-dpo, inpo and inversion-dpo, not {method!r}")
    out.loss.backward()
    params = models.trainable
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)
    return out.loss.detach()
