"""``fastinpo demo``: a complete preference alignment on a CPU — SFT-on-winners vs Diffusion-DPO vs DDIM-InPO.

The demo builds a tiny world in which a reward is known exactly, makes a tiny Stable-Diffusion-shaped pipeline a
real generator of that world, asks the generator for pairs of its own samples, labels each pair by the reward
(and nothing else) into a Pick-a-Pic parquet file, and then trains the three methods through the real trainer
(:func:`fastinpo.train.train`, the code ``fastinpo train`` runs) from the same start, on the same pairs, for the
same number of steps. Base and trained models are then sampled with the same prompts and the same initial noise.

The world (32×32 RGB): a dark background and one soft disc of a named colour at a random place and size; the
caption names the colour ("a red dot"). The reward, computed from the image and the caption's colour only:

    m_p = clamp(1 - |x_p - colour| / 0.5, 0, 1)        per pixel: how much it looks like the caption's colour
    reward = mean(m over the central disc of radius 8) - mean(m outside it)            in [-1, 1]

so "the caption's colour, and sitting in the centre" is what is preferred. The training images put the disc
anywhere, so the base generator does too and its samples vary in reward.

Honesty rules the code keeps:

- training sees the reward only through the preference labels of the parquet file (``label_0``/``label_1``);
- the evaluation seeds are disjoint from the seeds that made the preference pairs;
- every reported number is recomputable from the saved samples (``samples.npz``: uint8 images, the rewards are
  computed from exactly those bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

RES = 32  # image resolution
LATENT = 8  # latent side: the demo's VAE downsamples by 4 (latents 8×8×4)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
NOUNS = ("dot", "ball")
CAPTIONS = [f"a {c} {n}" for c in COLOURS for n in NOUNS]
BACKGROUND = 0.12
MATCH_RADIUS = 0.5  # colour distance at which a pixel stops counting as the caption's colour
CENTRE_RADIUS = 8.0  # pixels
METHODS = ("sft", "diffusion-dpo", "inpo")
LABELS = {"base": "base", "sft": "SFT", "diffusion-dpo": "Diffusion-DPO", "inpo": "DDIM-InPO"}
#: ``--arch sd3``: the same three trainer methods on a flow model are flow SFT, Flow-DPO and InPO for flows (SPEC §7;
#: the last is fastinpo's own extension, no paper reports it)
FLOW_LABELS = {"base": "base", "sft": "flow SFT", "diffusion-dpo": "Flow-DPO",
               "inpo": "InPO-flow (fastinpo's extension)"}


#: ``--arch sd3``: the length of the T5 part of the prompt embeddings. The demo's generator has no T5, so that part is
#: zeros (``StableDiffusion3Pipeline``'s convention; 256 tokens by default). For a model trained from scratch the length
#: of that padding is free, and at 256 it made 333 of the tiny MM-DiT's 397 tokens per sample: a training step at
#: batch 32 measured 9-10 s with them and 2.6 s without (1 thread, loaded machine). So the demo uses none — the 77
#: CLIP tokens only — in every encoder it builds (the caches the trainer reads, and the sampler).
SD3_T5_TOKENS = 0


def encoder_options(family) -> dict[str, Any]:
    """Keyword arguments of ``family.make_encoder`` for the demo (SD3: :data:`SD3_T5_TOKENS`)."""
    return {"max_sequence_length": SD3_T5_TOKENS} if family.name == "sd3" else {}


def labels_for(arch: str) -> dict[str, str]:
    """The row names of the demo's table, plot and sample grid for generator ``arch`` (``sd15`` or ``sd3``)."""
    return FLOW_LABELS if arch == "sd3" else LABELS


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class DemoSettings:
    """Everything the demo chooses; written into the report."""

    # phase 1-2: world and generator
    unet_channels: tuple[int, int] = (32, 64)
    world_images: int = 1024  # training images of the world (the generator's data)
    vae_steps: int = 400
    vae_batch: int = 16
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-4  # per-element KL weight: keeps the posterior a posterior, latents smooth
    pretrain_steps: int = 1000
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    pretrain_caption_dropout: float = 0.1  # so classifier-free guidance has an unconditional model
    # phase 3: preference pairs from the model's own samples
    pair_prompts: int = 384  # pairs (two samples per caption each)
    tie_margin: float = 0.02  # |reward difference| below which a pair is a tie (label 0.5, dropped by the loader)
    # phase 4: preference training (identical for the three methods except β, which SFT does not have)
    pref_steps: int = 120
    pref_batch: int = 16
    pref_lr: float = 1e-4
    # SPEC convention (with the factor 0.5), the same β for Diffusion-DPO and InPO. Smaller than the papers' 2000-5000:
    # with this tiny model and lr, β = 2000 drove both DPO losses above log 2 (saturated, noisy updates)
    beta: float = 500.0
    inversion_levels: int = 10  # InPO K (official)
    eta: float = 0.1  # InPO inversion noise (official)
    caption_dropout: float = 0.2  # official for Diffusion-DPO and InPO; SFT gets the same
    checkpoints: int = 3  # evaluation points per method (besides the start)
    # phase 5: evaluation
    eval_seeds: int = 12  # per caption: len(CAPTIONS) * eval_seeds samples per model
    sample_steps: int = 20  # DDIM steps (eta 0: deterministic given the initial noise)
    guidance_scale: float = 3.0
    grid_seeds: int = 16  # columns of samples.png


QUICK = dict(world_images=512, vae_steps=300, pretrain_steps=500, pair_prompts=256, pref_steps=60, eval_seeds=16,
             sample_steps=15, checkpoints=2)


def settings_for(quick: bool) -> DemoSettings:
    return DemoSettings(**QUICK) if quick else DemoSettings()


# ----------------------------------------------------------------------------------------------- the world
def colour_of(caption: str) -> str:
    for name in COLOURS:
        if name in caption.split():
            return name
    raise ValueError(f"caption {caption!r} names none of the colours {list(COLOURS)}")


def _centre_mask() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(RES), torch.arange(RES), indexing="ij")
    c = (RES - 1) / 2
    return (((yy - c) ** 2 + (xx - c) ** 2).sqrt() <= CENTRE_RADIUS).float()


def reward(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The world's reward of ``images`` ``(n, 3, 32, 32)`` in [0, 1] (float) or uint8, given their captions."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    colour = torch.tensor([COLOURS[colour_of(c)] for c in captions], dtype=torch.float32)
    dist = (x - colour[:, :, None, None]).norm(dim=1)  # (n, H, W)
    match = (1.0 - dist / MATCH_RADIUS).clamp(min=0.0)
    centre = _centre_mask()
    inside = (match * centre).sum((1, 2)) / centre.sum()
    outside = (match * (1 - centre)).sum((1, 2)) / (1 - centre).sum()
    return inside - outside


def world_image(rng: np.random.Generator, caption: str) -> np.ndarray:
    """One 32×32 uint8 image: a soft disc of the caption's colour, uniform place and radius, dark background."""
    radius = rng.uniform(4.0, 7.0)
    cy, cx = rng.uniform(radius, RES - 1 - radius, size=2)
    yy, xx = np.mgrid[0:RES, 0:RES].astype(np.float32)
    alpha = np.clip(radius + 0.5 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0.0, 1.0)[..., None]
    img = BACKGROUND * (1 - alpha) + np.asarray(COLOURS[colour_of(caption)], np.float32) * alpha
    return np.round(img * 255).astype(np.uint8)


def world(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` world images (n, 32, 32, 3) uint8 and their captions (cycling through :data:`CAPTIONS`)."""
    rng = np.random.default_rng(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return np.stack([world_image(rng, c) for c in captions]), captions


def to_chw(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) uint8."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    from fastinpo.data.pickapic import encode_image

    return encode_image(Image.fromarray(img), "PNG")


# ----------------------------------------------------------------------------------------------- phase 2: generator
def train_vae(folder: Path, images: np.ndarray, s: DemoSettings, seed: int, progress: bool) -> dict[str, Any]:
    """Train the tiny pipeline's VAE to reconstruct the world (MSE + a small KL), set its ``scaling_factor`` so the
    latents have unit variance (what the diffusion schedule assumes), save it in place; report the held-out
    reconstruction error and how well the reward of decoded images tracks the reward of the originals."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    n_val = max(len(images) // 8, 32)
    pix = to_chw(images).float() / 127.5 - 1.0
    train_pix, val_pix = pix[n_val:], pix[:n_val]
    opt = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.vae_steps)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(s.vae_steps), desc="2a VAE", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(train_pix), (s.vae_batch,), generator=g)
        x = train_pix[idx]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=g)).sample
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = (recon - x).square().mean() + s.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        mean = torch.cat([vae.encode(train_pix[i:i + 128]).latent_dist.mean for i in range(0, len(train_pix), 128)])
        scaling = float(1.0 / mean.std())
        dec = vae.decode(vae.encode(val_pix).latent_dist.mean).sample.clamp(-1, 1)
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    val_caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n_val)]  # world() cycles captions from index 0
    r_orig = reward((val_pix + 1) / 2, val_caps)
    r_dec = reward((dec + 1) / 2, val_caps)
    return {"recon_mse_01": float(((dec - val_pix) / 2).square().mean()),  # in [0, 1] pixel units
            "reward_corr": float(torch.corrcoef(torch.stack([r_orig, r_dec]))[0, 1]),
            "reward_mean_original": float(r_orig.mean()), "reward_mean_decoded": float(r_dec.mean()),
            "scaling_factor": scaling, "held_out_images": n_val}


def _train_config(**over: Any):
    from fastinpo.config import load_config

    return load_config(None, [f"{k.replace('__', '.')}={json.dumps(v)}"
                              for k, v in over.items()])


def pretrain_unet(folder: Path, work: Path, images: np.ndarray, captions: list[str], s: DemoSettings, seed: int,
                  progress: bool) -> Path:
    """Plain denoising training of the tiny UNet on the world, through the trainer's ``sft`` method: a Pick-a-Pic
    file whose pair i is (world image i, world image i+1) with image 0 the winner, so SFT's winners are exactly the
    world images. Returns the exported ``unet/`` folder."""
    from fastinpo.data.cache import build_cache
    from fastinpo.data.pickapic import PickAPicDataset, write_pickapic_parquet
    from fastinpo.models.family import family_for_folder
    from fastinpo.train import train

    family = family_for_folder(folder)
    data = work / "world-data"
    data.mkdir(parents=True, exist_ok=True)
    n = len(images)
    rows = [{"caption": captions[i], "jpg_0": _png(images[i]), "jpg_1": _png(images[(i + 1) % n]),
             "label_0": 1.0, "label_1": 0.0} for i in range(n)]
    write_pickapic_parquet(data / "train-00000.parquet", rows)
    # Encode the world once into the trainer's latent/text cache (`fastinpo cache`): otherwise every step would
    # re-decode the PNGs and re-run the VAE on both images of every pair, the larger part of a tiny step's cost.
    cache = work / "world-cache"
    dataset = PickAPicDataset(data, RES)
    build_cache(dataset, family.make_encoder(family.load_components(folder, load_unet=False), "cpu",
                                             **encoder_options(family)), cache, progress=progress, overwrite=True)
    config = _train_config(
        model__path=str(folder), data__path=str(data), data__cache_dir=str(cache), data__resolution=RES,
        data__caption_dropout=s.pretrain_caption_dropout, method__name="sft", optim__lr=s.pretrain_lr,
        optim__scale_lr=False, optim__lr_scheduler="cosine", optim__warmup_steps=min(50, s.pretrain_steps // 10),
        train__max_steps=s.pretrain_steps, train__pairs_per_batch=s.pretrain_batch,
        train__output_dir=str(work / "pretrain"), train__seed=seed, train__log_every=50,
        train__checkpoint_every=0, train__keep_last=1, train__progress=progress)
    if (work / "pretrain").exists():  # the demo's own scratch run of an earlier demo: the trainer would refuse it
        shutil.rmtree(work / "pretrain")
    summary = train(config)
    return Path(summary["export"]) / family.denoiser_folder


def make_demo_sd3_pipeline(folder: Path, seed: int, channels: tuple[int, int] = (32, 64)) -> Path:
    """``--arch sd3``: the tiny SD3 pipeline of :func:`fastinpo.models.sd3.make_tiny_sd3_pipeline` (two CLIP text
    encoders, tokenizers, the flow-matching scheduler, no T5) with the demo's 4x-downsampling VAE (no shift) and an
    MM-DiT sized for its 8×8×4 latents (patch 1, width ``channels[1]``)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from fastinpo.models.sd3 import TINY_TEXT_DIM, make_tiny_sd3_pipeline

    make_tiny_sd3_pipeline(folder, seed=seed, sample_size=RES)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=RES, shift_factor=0.0)
    width = channels[1]
    transformer = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
        num_attention_heads=width // 16, joint_attention_dim=2 * TINY_TEXT_DIM, caption_projection_dim=width,
        pooled_projection_dim=2 * TINY_TEXT_DIM, pos_embed_max_size=LATENT, qk_norm="rms_norm")
    for name, module in (("vae", vae), ("transformer", transformer)):
        shutil.rmtree(folder / name)
        module.save_pretrained(folder / name, safe_serialization=True)
    return folder


def make_demo_pipeline(folder: Path, seed: int, channels: tuple[int, int] = (32, 64)) -> Path:
    """The tiny SD1.5 pipeline of :func:`fastinpo.models.sd.make_tiny_pipeline` (text encoder, tokenizer, scheduler)
    with a VAE that downsamples by 4 instead of 2 and a UNet sized for its 8×8×4 latents: a quarter of the UNet
    work per sample, which is what lets the demo train a real generator in a few CPU minutes. Saved in the
    standard diffusers layout, so the trainer and stock diffusers load it like a real model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fastinpo.models.sd import TINY_TEXT_DIM, make_tiny_pipeline, tiny_unet_config

    make_tiny_pipeline(folder, "sd15", seed=seed, sample_size=RES)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=RES)
    unet_cfg = tiny_unet_config("sd15")
    unet_cfg.update(sample_size=LATENT, cross_attention_dim=TINY_TEXT_DIM, block_out_channels=tuple(channels),
                    attention_head_dim=tuple(c // 8 for c in channels))
    unet = UNet2DConditionModel(**unet_cfg)
    for name, module in (("vae", vae), ("unet", unet)):
        shutil.rmtree(folder / name)
        module.save_pretrained(folder / name, safe_serialization=True)
    return folder


def make_base_pipeline(out: Path, s: DemoSettings, seed: int, progress: bool, arch: str = "sd15") -> dict[str, Any]:
    """Phase 1-2: the world, the tiny pipeline, its VAE and UNet (``arch="sd3"``: MM-DiT) trained on the world; the
    base pipeline in ``out/base`` (standard diffusers layout)."""
    images, captions = world(s.world_images, seed)
    folder = out / "base"
    if folder.exists():
        shutil.rmtree(folder)
    (make_demo_sd3_pipeline if arch == "sd3" else make_demo_pipeline)(folder, seed, s.unet_channels)
    t0 = time.perf_counter()
    vae_report = train_vae(folder, images, s, seed, progress)
    t_vae = time.perf_counter() - t0
    unet_dir = pretrain_unet(folder, out / "work", images, captions, s, seed, progress)
    shutil.rmtree(folder / unet_dir.name)
    shutil.copytree(unet_dir, folder / unet_dir.name)
    return {"folder": str(folder), "vae": vae_report, "vae_seconds": t_vae,
            "pretrain_seconds": time.perf_counter() - t0 - t_vae,
            "world_reward_mean": float(reward(to_chw(images), captions).mean())}


# ----------------------------------------------------------------------------------------------- sampling
class Sampler:
    """Deterministic DDIM sampling (η = 0) of a pipeline folder with any UNet weights, classifier-free guidance,
    and initial noise fixed per seed: the same (prompt, seed) starts every model from the same latent.

    (A small stand-in for :mod:`fastinpo.eval.sampling`; the stock diffusers scheduler built from the model's own
    scheduler config, never the class defaults.)"""

    def __init__(self, folder: Path, steps: int, guidance_scale: float):
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        from fastinpo.models.family import family_for_folder

        family = family_for_folder(folder)
        self.flow = family.name == "sd3"  # SD3: the flow Euler sampler of its own scheduler, velocity CFG
        comps = family.load_components(folder)
        self.family = family
        self.encoder = family.make_encoder(comps, "cpu", **encoder_options(family))
        self.unet = comps.unet.requires_grad_(False)
        self.base_state = {k: v.clone() for k, v in self.unet.state_dict().items()}
        scheduler_cls = FlowMatchEulerDiscreteScheduler if self.flow else DDIMScheduler
        self.scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler")
        self.steps, self.guidance = steps, guidance_scale
        self._text: dict[str, torch.Tensor] = {}
        self._pooled: dict[str, torch.Tensor] = {}

    def load(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Base weights (None) or a trained state (a checkpoint's ``trainable.safetensors``)."""
        self.unet.load_state_dict(self.base_state)
        if weights is not None:
            missing = set(weights) - set(self.base_state)
            if missing:
                raise ValueError(f"checkpoint has unknown UNet weights: {sorted(missing)[:3]}")
            self.unet.load_state_dict(weights, strict=False)

    def _embed(self, captions: list[str]) -> torch.Tensor:
        todo = [c for c in dict.fromkeys(captions) if c not in self._text]
        if todo:
            emb, pooled = self.encoder.encode_text(todo)
            self._text.update(zip(todo, emb, strict=True))
            if pooled is not None:
                self._pooled.update(zip(todo, pooled, strict=True))
        return torch.stack([self._text[c] for c in captions])

    @staticmethod
    def noise(seeds: list[int]) -> torch.Tensor:
        return torch.stack([torch.randn(4, LATENT, LATENT, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds])

    @torch.no_grad()
    def generate(self, captions: list[str], seeds: list[int], batch: int = 128) -> torch.Tensor:
        """uint8 images ``(n, 3, 32, 32)``."""
        out = []
        for i in range(0, len(captions), batch):
            caps, sds = captions[i:i + batch], seeds[i:i + batch]
            cond = self._embed(caps)
            uncond = self._embed([""]).expand_as(cond)
            emb = torch.cat([uncond, cond])
            if self.flow:
                out.append(self._generate_flow(caps, sds, emb))
                continue
            self.scheduler.set_timesteps(self.steps)
            x = self.noise(sds) * self.scheduler.init_noise_sigma
            for t in self.scheduler.timesteps:
                eps_u, eps_c = self.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
                x = self.scheduler.step(eps_u + self.guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample
            img = self.encoder.vae.decode(x / self.encoder.scaling_factor).sample
            out.append(((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        return torch.cat(out)


    def _generate_flow(self, caps: list[str], sds: list[int], emb: torch.Tensor) -> torch.Tensor:
        """SD3: ``StableDiffusion3Pipeline``'s loop (Euler steps of the flow scheduler, CFG on velocities), decoded
        with the VAE's scale and shift."""
        pooled = torch.stack([self._pooled[c] for c in [""] * len(caps) + list(caps)])
        self.scheduler.set_timesteps(self.steps)
        x = self.noise(sds)
        for t in self.scheduler.timesteps:
            v_u, v_c = self.unet(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * len(caps)),
                                 encoder_hidden_states=emb, pooled_projections=pooled).sample.chunk(2)
            x = self.scheduler.step(v_u + self.guidance * (v_c - v_u), t, x).prev_sample
        img = self.encoder.vae.decode(x / self.encoder.scaling_factor + self.encoder.shift_factor).sample
        return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------- phase 3: pairs
PAIR_SEED_OFFSET = 1_000_000  # pair-generation seeds live far from the evaluation seeds (0 .. eval_seeds-1)


def make_pairs(sampler: Sampler, out: Path, s: DemoSettings, seed: int, progress: bool) -> dict[str, Any]:
    """Two samples of the base model per caption; the higher reward wins; |Δ| < tie_margin is written as a tie
    (label 0.5), which the loader drops by default (as Pick-a-Pic's ties are)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from fastinpo.data.pickapic import encode_image, write_pickapic_parquet

    sampler.load(None)
    n = s.pair_prompts
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    base_seed = PAIR_SEED_OFFSET + seed * 100_000
    seeds0 = [base_seed + 2 * i for i in range(n)]
    seeds1 = [base_seed + 2 * i + 1 for i in range(n)]
    imgs = []
    for i in tqdm(range(0, n, 64), desc="3 pairs", unit="x64 pairs", disable=not progress):
        imgs.append(sampler.generate(caps[i:i + 64] * 2, seeds0[i:i + 64] + seeds1[i:i + 64]))
    chunks = [c.chunk(2) for c in imgs]
    im0, im1 = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    r0, r1 = reward(im0, caps), reward(im1, caps)
    rows, ties = [], 0
    for i in range(n):
        d = float(r0[i] - r1[i])
        label = 0.5 if abs(d) < s.tie_margin else (1.0 if d > 0 else 0.0)
        ties += label == 0.5
        rows.append({"caption": caps[i],
                     "jpg_0": encode_image(Image.fromarray(im0[i].permute(1, 2, 0).numpy()), "PNG"),
                     "jpg_1": encode_image(Image.fromarray(im1[i].permute(1, 2, 0).numpy()), "PNG"),
                     "label_0": label, "label_1": 1.0 - label})
    data = out / "pairs"
    data.mkdir(parents=True, exist_ok=True)
    write_pickapic_parquet(data / "train-00000.parquet", rows)
    win = torch.where(r0 >= r1, r0, r1)
    lose = torch.where(r0 >= r1, r1, r0)
    kept = (r0 - r1).abs() >= s.tie_margin
    return {"path": str(data), "rows": n, "ties_dropped": int(ties), "pairs": int(kept.sum()),
            "winner_reward_mean": float(win[kept].mean()), "loser_reward_mean": float(lose[kept].mean()),
            "sample_reward_mean": float(torch.cat([r0, r1]).mean())}


# ----------------------------------------------------------------------------------------------- phase 4: training
def train_method(method: str, base: Path, data: Path, out: Path, s: DemoSettings, seed: int, progress: bool, *,
                 lr: float | None = None, validation_fraction: float = 0.0, cache_dir: Path | None = None):
    """One preference run through the trainer; checkpoints at ``checkpoints`` evenly spaced steps. ``lr`` replaces
    ``pref_lr``; ``validation_fraction`` > 0 holds out that fraction of the pairs and validates at every checkpoint,
    keeping the checkpoint of best validation implicit accuracy (the sweep). ``cache_dir``: the pairs' latent/text
    cache (``--arch sd3``: encoded with the demo's prompt length); none: the trainer encodes each step."""
    from fastinpo.train import train

    every = max(1, s.pref_steps // s.checkpoints)
    extra = dict(data__validation_fraction=validation_fraction, train__validate_every=every,
                 train__keep_best="val_implicit_acc") if validation_fraction > 0 else {}
    if cache_dir is not None:
        extra["data__cache_dir"] = str(cache_dir)
    config = _train_config(
        model__path=str(base), data__path=str(data), data__resolution=RES, data__caption_dropout=s.caption_dropout,
        method__name=method, method__beta=s.beta, method__inversion_levels=s.inversion_levels, method__eta=s.eta,
        optim__lr=s.pref_lr if lr is None else lr, optim__scale_lr=False, optim__lr_scheduler="constant",
        optim__warmup_steps=0,
        train__max_steps=s.pref_steps, train__pairs_per_batch=s.pref_batch, train__output_dir=str(out),
        train__seed=seed, train__log_every=max(1, s.pref_steps // 10), train__checkpoint_every=every,
        train__keep_last=s.checkpoints + 1, train__progress=progress, **extra)
    t0 = time.perf_counter()
    train(config)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- phase 5: eval
def summarize(rewards: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """Mean reward ± standard error; the gain over base with the standard error of the *paired* difference (same
    prompt and initial noise per sample, so the pairing removes the prompt/noise variance); win rate, ties ½."""
    n = len(rewards)
    diff = rewards - base
    wins = float(np.mean((rewards > base) + 0.5 * (rewards == base)))

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    return {"mean": float(rewards.mean()), "se": se(rewards), "gain_vs_base": float(diff.mean()),
            "gain_se_paired": se(diff), "win_rate_vs_base": wins, "n": n}


def evaluate(sampler: Sampler, runs: dict[str, Path], s: DemoSettings, progress: bool):
    """Samples of base and of every checkpoint with the same prompts and seeds; returns the uint8 samples by key
    (``base``, ``<method>@<step>``) and the evaluation prompts/seeds."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from fastinpo.train import checkpoint as ckpt

    caps = [c for c in CAPTIONS for _ in range(s.eval_seeds)]
    seeds = [k for _ in CAPTIONS for k in range(s.eval_seeds)]
    todo: list[tuple[str, Path | None]] = [("base", None)]
    for method, run in runs.items():
        todo += [(f"{method}@{step}", path / ckpt.WEIGHTS) for step, path in ckpt.list_checkpoints(run)]
    samples = {}
    for key, weights in tqdm(todo, desc="5 evaluate", unit="model", disable=not progress):
        sampler.load(None if weights is None else load_file(weights))
        samples[key] = sampler.generate(caps, seeds)
    sampler.load(None)
    return samples, caps, seeds


# ----------------------------------------------------------------------------------------------- the demo
def run_comparison(out: Path, base: Path, s: DemoSettings, seed: int, progress: bool,
                   labels: dict[str, str] = LABELS) -> dict[str, Any]:
    """Phases 3-5 for one seed."""
    sampler = Sampler(base, s.sample_steps, s.guidance_scale)
    t0 = time.perf_counter()
    pairs = make_pairs(sampler, out, s, seed, progress)
    cache = None
    if sampler.family.name == "sd3":  # the trainer reads the pairs through a cache made by the demo's encoder
        from fastinpo.data.cache import build_cache
        from fastinpo.data.pickapic import PickAPicDataset

        cache = out / "pairs-cache"
        build_cache(PickAPicDataset(pairs["path"], RES), sampler.encoder, cache, progress=progress, overwrite=True)
    t_pairs = time.perf_counter() - t0
    runs, train_seconds = {}, {}
    for i, method in enumerate(METHODS):
        if progress:
            print(f"4 train [{i + 1}/{len(METHODS)}] {labels[method]}", flush=True)
        runs[method] = out / "runs" / method
        if runs[method].exists():
            shutil.rmtree(runs[method])
        train_seconds[method] = train_method(method, base, Path(pairs["path"]), runs[method], s, seed, progress,
                                             cache_dir=cache)
    t1 = time.perf_counter()
    samples, caps, seeds = evaluate(sampler, runs, s, progress)
    t_eval = time.perf_counter() - t1
    rewards = {k: reward(v, caps).numpy() for k, v in samples.items()}
    np.savez_compressed(out / "samples.npz", **{k: v.numpy() for k, v in samples.items()},
                        captions=np.array(caps), seeds=np.array(seeds))
    final = {"base": summarize(rewards["base"], rewards["base"])}
    curves: dict[str, list[list[float]]] = {}
    for method in METHODS:
        steps = sorted(int(k.split("@")[1]) for k in samples if k.startswith(method + "@"))
        curves[method] = [[0, float(rewards["base"].mean())]] + [
            [st, float(rewards[f"{method}@{st}"].mean())] for st in steps]
        final[method] = summarize(rewards[f"{method}@{steps[-1]}"], rewards["base"])
        final[method]["step"] = steps[-1]
    metrics = {m: [json.loads(line) for line in (runs[m] / "metrics.jsonl").read_text().splitlines()]
               for m in METHODS}
    return {"seed": seed, "pairs": pairs, "final": final, "reward_vs_step": curves,
            "per_sample_rewards": {k: v.round(6).tolist() for k, v in rewards.items()},
            "train_metrics_last": {m: rows[-1] for m, rows in metrics.items()},
            "seconds": {"pairs": t_pairs, "train": train_seconds, "eval": t_eval},
            "samples_file": str((out / "samples.npz").name)}


def run_demo(out_dir: str | Path, *, quick: bool = False, seeds: int = 1, progress: bool = True,
             threads: int | None = None, arch: str = "sd15") -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the report (also written to ``out_dir/report.json``).

    ``threads`` sets torch's CPU threads (default: torch's choice). The models are so small that on a shared
    machine one thread is often faster than several fighting for busy cores. The caller's setting is restored
    afterwards (the thread count changes float summation order, so it must not leak into later work)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run_demo(out_dir, quick=quick, seeds=seeds, progress=progress, arch=arch)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out_dir: str | Path, *, quick: bool, seeds: int, progress: bool, arch: str = "sd15") -> dict[str, Any]:
    if arch not in ("sd15", "sd3"):
        raise ValueError(f"the demo's generator is sd15 (default) or sd3, got {arch!r}")
    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = settings_for(quick)
    t0 = time.perf_counter()
    if progress:
        print(f"fastinpo demo ({'quick' if quick else 'full'}, {seeds} seed(s)) -> {out}", flush=True)
        print(f"1-2 world + generator: train the tiny VAE and {'MM-DiT' if arch == 'sd3' else 'UNet'} on the world",
              flush=True)
    generator = make_base_pipeline(out, s, seed=0, progress=progress, arch=arch)
    per_seed = []
    for k in range(seeds):
        if progress:
            print(f"--- comparison seed {k} ({k + 1}/{seeds}) ---", flush=True)
        per_seed.append(run_comparison(out / f"seed-{k}", Path(generator["folder"]), s, seed=k, progress=progress,
                                       labels=labels_for(arch)))
    report = {"settings": asdict(s), "quick": quick, "world": {"captions": CAPTIONS, "colours": COLOURS,
              "reward": "mean colour match inside the centre disc (radius 8) minus outside; match = "
                        "clamp(1 - |x - colour| / 0.5, 0, 1), x in [0, 1]", "resolution": RES},
              "generator": generator, "seeds": per_seed, "aggregate": aggregate(per_seed)}
    if arch == "sd3":  # the default (SD1.5) report stays as it was
        report["arch"] = "sd3 (flow matching: flow SFT, Flow-DPO, InPO for flows - fastinpo's own extension)"
        report["labels"] = FLOW_LABELS
    report["seconds_total"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_reward_vs_step(report, out / "reward_vs_step.png")
    sample_grid(out / "seed-0", s, out / "samples.png", labels=report.get("labels", LABELS))
    if progress:
        print(format_table(report), flush=True)
    return report


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Over seeds: mean of the per-seed means with its spread (std over seeds and its standard error), mean win
    rate, and the gain over base."""
    agg = {}
    for m in ("base", *METHODS):
        means = np.array([r["final"][m]["mean"] for r in per_seed])
        gains = means - np.array([r["final"]["base"]["mean"] for r in per_seed])
        wins = np.array([r["final"][m]["win_rate_vs_base"] for r in per_seed])
        k = len(means)
        sd = float(means.std(ddof=1)) if k > 1 else 0.0
        agg[m] = {"mean": float(means.mean()), "std_over_seeds": sd, "gain_over_base": float(gains.mean()),
                  "gain_std_over_seeds": float(gains.std(ddof=1)) if k > 1 else 0.0,
                  "win_rate_vs_base": float(wins.mean()), "seeds": k}
    if len(per_seed) > 1:
        diff = np.array([r["final"]["inpo"]["mean"] - r["final"]["diffusion-dpo"]["mean"] for r in per_seed])
        agg["inpo_minus_dpo"] = {"mean": float(diff.mean()), "std_over_seeds": float(diff.std(ddof=1)),
                                 "per_seed": diff.tolist()}
    return agg


def format_table(report: dict[str, Any]) -> str:
    labels = report.get("labels", LABELS)  # sd3 reports name the flow methods (FLOW_LABELS)
    width = max(14, *map(len, labels.values()))
    lines = []
    for r in report["seeds"]:
        lines.append(f"seed {r['seed']}: {r['pairs']['pairs']} pairs ({r['pairs']['ties_dropped']} near-ties "
                     f"dropped), {report['settings']['pref_steps']} steps each")
        lines.append(f"  {'model':<{width}} {'reward':>16} {'win vs base':>12}")
        for m in ("base", *METHODS):
            f = r["final"][m]
            lines.append(f"  {labels[m]:<{width}} {f['mean']:>8.4f} ± {f['se']:.4f} {f['win_rate_vs_base']:>12.2f}")
    if len(report["seeds"]) > 1:
        a = report["aggregate"]
        lines.append(f"over {len(report['seeds'])} seeds (mean ± std over seeds)")
        lines.append(f"  {'model':<{width}} {'reward':>16} {'gain vs base':>18} {'win vs base':>12}")
        for m in ("base", *METHODS):
            x = a[m]
            lines.append(f"  {labels[m]:<{width}} {x['mean']:>8.4f} ± {x['std_over_seeds']:.4f} "
                         f"{x['gain_over_base']:>+9.4f} ± {x['gain_std_over_seeds']:.4f} "
                         f"{x['win_rate_vs_base']:>12.2f}")
        d = a["inpo_minus_dpo"]
        names = ("InPO-flow", "Flow-DPO") if "labels" in report else ("InPO", "DPO")
        lines.append(f"  {names[0]} - {names[1]}: {d['mean']:+.4f} ± {d['std_over_seeds']:.4f} (std over seeds)")
    return "\n".join(lines)


def plot_reward_vs_step(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    colors = {"sft": "tab:gray", "diffusion-dpo": "tab:blue", "inpo": "tab:red"}
    for m in METHODS:
        curves = np.array([r["reward_vs_step"][m] for r in report["seeds"]])  # (seeds, points, 2)
        steps, mean = curves[0, :, 0], curves[:, :, 1].mean(0)
        ax.plot(steps, mean, "o-", color=colors[m], label=report.get("labels", LABELS)[m])
        if len(curves) > 1:
            sd = curves[:, :, 1].std(0, ddof=1)
            ax.fill_between(steps, mean - sd, mean + sd, color=colors[m], alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward of samples")
    n = len(report["seeds"])
    ax.set_title(f"reward vs step ({n} seed{'s' if n > 1 else ''}{', ±1 std' if n > 1 else ''})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid(seed_dir: Path, s: DemoSettings, path: Path, labels: dict[str, str] = LABELS) -> None:
    """Rows: methods (final checkpoints); columns: the same (caption, seed) for every row."""
    from PIL import Image, ImageDraw

    data = np.load(seed_dir / "samples.npz")
    keys = ["base"] + [max((k for k in data.files if k.startswith(m + "@")), key=lambda k: int(k.split("@")[1]))
                       for m in METHODS]
    # column i: caption i mod 8 with evaluation seed i // 8 (samples are stored caption-major)
    n_cols = min(s.grid_seeds, len(CAPTIONS) * s.eval_seeds)
    cols = [(i % len(CAPTIONS)) * s.eval_seeds + i // len(CAPTIONS) for i in range(n_cols)]
    scale = 2
    label_w = max(110, 6 * max(map(len, labels.values())) + 12)  # PIL's default font: ~6 px per character
    cell = RES * scale
    img = Image.new("RGB", (label_w + cell * len(cols), cell * len(keys)), "white")
    draw = ImageDraw.Draw(img)
    for r, key in enumerate(keys):
        draw.text((4, r * cell + cell // 2 - 6), labels[key.split("@")[0]], fill="black")
        for c, j in enumerate(cols):
            tile = Image.fromarray(data[key][j].transpose(1, 2, 0)).resize((cell, cell),
                                                                                            Image.NEAREST)
            img.paste(tile, (label_w + c * cell, r * cell))
    img.save(path)


# ----------------------------------------------------------------------------------------------- the sweep
#: the sweep's learning rates: the same for every method, spanning 10× around the demo's 1e-4
SWEEP_LRS = (3e-5, 1e-4, 3e-4)
SWEEP_VALIDATION_FRACTION = 0.15  # of the pair rows, held out by row hash: validation only, never trained on
SWEEP_CHECKPOINTS = 4  # validations (= checkpoints) per run
SWEEP_TARGET_GAIN = 0.05  # the reward gain over base whose cost (pairs seen, seconds) the report gives


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def sweep_seed(out: Path, base: Path, s: DemoSettings, seed: int, lrs: tuple[float, ...], progress: bool,
               validation_fraction: float = SWEEP_VALIDATION_FRACTION,
               target_gain: float = SWEEP_TARGET_GAIN) -> dict[str, Any]:
    """One seed of the sweep: pairs, every (method, lr) run with validation, the reward of every checkpoint, and
    each method's selection — the run and checkpoint of highest validation implicit accuracy (ties: lower
    validation loss, then the smaller lr). The reward is never used to select."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from fastinpo.train import checkpoint as ckpt

    sampler = Sampler(base, s.sample_steps, s.guidance_scale)
    t0 = time.perf_counter()
    pairs = make_pairs(sampler, out, s, seed, progress)
    t_pairs = time.perf_counter() - t0
    runs: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        for lr in lrs:
            key = f"{method}|{_lr_key(lr)}"
            run_dir = out / "runs" / method / f"lr-{_lr_key(lr)}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            if progress:
                print(f"4 train {LABELS[method]} lr {lr:g}", flush=True)
            seconds = train_method(method, base, Path(pairs["path"]), run_dir, s, seed, progress, lr=lr,
                                   validation_fraction=validation_fraction)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            val = [r for r in rows if "val_implicit_acc" in r]
            summary = json.loads((run_dir / "summary.json").read_text())
            runs[key] = {"method": method, "lr": lr, "dir": run_dir, "train_seconds": seconds,
                         "validation_seconds": float(sum(r["val_seconds"] for r in val)),
                         "validation": [{k: r[k] for k in ("step", "val_implicit_acc", "val_loss",
                                                           "val_reward_margin", "val_model_ref_gap")} for r in val],
                         "best_step": summary["validation"]["best_step"],
                         "best_val_implicit_acc": summary["validation"]["best_value"],
                         "val_pairs": val[0]["val_pairs"] if val else 0, "train_pairs": summary["pairs"]}
    caps = [c for c in CAPTIONS for _ in range(s.eval_seeds)]
    seeds = [k for _ in CAPTIONS for k in range(s.eval_seeds)]
    todo: list[tuple[str, Path | None]] = [("base", None)]
    for key, run in runs.items():
        todo += [(f"{key}@{step}", path / ckpt.WEIGHTS) for step, path in ckpt.list_checkpoints(run["dir"])]
    t1 = time.perf_counter()
    rewards: dict[str, np.ndarray] = {}
    for key, weights in tqdm(todo, desc="5 evaluate", unit="model", disable=not progress):
        sampler.load(None if weights is None else load_file(weights))
        rewards[key] = reward(sampler.generate(caps, seeds), caps).numpy()
    sampler.load(None)
    t_eval = time.perf_counter() - t1
    base_mean = float(rewards["base"].mean())
    curves: dict[str, dict[str, list[list[float]]]] = {m: {} for m in METHODS}
    for key, run in runs.items():
        steps = sorted(int(k.rsplit("@", 1)[1]) for k in rewards if k.startswith(key + "@"))
        curves[run["method"]][_lr_key(run["lr"])] = [[0, base_mean]] + [
            [st, float(rewards[f"{key}@{st}"].mean())] for st in steps]
    selected: dict[str, Any] = {"base": summarize(rewards["base"], rewards["base"])}
    for method in METHODS:
        candidates = [r for r in runs.values() if r["method"] == method]

        def rank(r):
            at_best = next((v for v in r["validation"] if v["step"] == r["best_step"]), {"val_loss": math.inf})
            return (-r["best_val_implicit_acc"], at_best["val_loss"], r["lr"])

        choice = min(candidates, key=rank)
        key = f"{method}|{_lr_key(choice['lr'])}"
        result = summarize(rewards[f"{key}@{choice['best_step']}"], rewards["base"])
        curve = curves[method][_lr_key(choice["lr"])]
        reached = next(((st, r) for st, r in curve[1:] if r - base_mean >= target_gain), None)
        steady = choice["train_seconds"] - choice["validation_seconds"]  # training alone, validation excluded
        result.update(lr=choice["lr"], step=choice["best_step"], val_implicit_acc=choice["best_val_implicit_acc"],
                      final_step_reward=curve[-1][1],
                      to_target_gain=None if reached is None else {
                          "step": int(reached[0]), "pairs_seen": int(reached[0]) * s.pref_batch,
                          "seconds": steady * reached[0] / s.pref_steps})
        selected[method] = result
    return {"seed": seed, "pairs": pairs, "selected": selected, "reward_vs_step": curves,
            "runs": {k: {kk: (str(v) if kk == "dir" else v) for kk, v in r.items()} for k, r in runs.items()},
            "per_sample_rewards": {k: v.round(6).tolist() for k, v in rewards.items()},
            "seconds": {"pairs": t_pairs, "train": {k: r["train_seconds"] for k, r in runs.items()},
                        "validation": {k: r["validation_seconds"] for k, r in runs.items()}, "eval": t_eval}}


def run_sweep(out_dir: str | Path, *, quick: bool = False, seeds: int = 3, progress: bool = True,
              threads: int | None = None, settings: DemoSettings | None = None,
              lrs: tuple[float, ...] = SWEEP_LRS) -> dict[str, Any]:
    """``fastinpo demo --sweep``: every method with the same learning rates ``lrs`` and step budget, each
    method's run and checkpoint selected by validation implicit accuracy on held-out pairs only; the report
    (``sweep_report.json``, ``sweep_reward_vs_step.png``, a table) gives the selected checkpoint's reward ± s.e.,
    its win rate vs base, reward vs step for every lr, and the pairs and seconds each method needed to reach a
    reward gain of :data:`SWEEP_TARGET_GAIN`."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(0)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        s = settings or replace(settings_for(quick), checkpoints=SWEEP_CHECKPOINTS)
        t0 = time.perf_counter()
        if progress:
            print(f"fastinpo demo --sweep ({'quick' if quick else 'full'}, {seeds} seed(s), lrs "
                  f"{', '.join(map(_lr_key, lrs))}) -> {out}", flush=True)
        generator = make_base_pipeline(out, s, seed=0, progress=progress)
        per_seed = []
        for k in range(seeds):
            if progress:
                print(f"--- sweep seed {k} ({k + 1}/{seeds}) ---", flush=True)
            per_seed.append(sweep_seed(out / f"seed-{k}", Path(generator["folder"]), s, k, tuple(lrs), progress))
        report = {"settings": asdict(s), "quick": quick, "lrs": list(lrs),
                  "validation_fraction": SWEEP_VALIDATION_FRACTION, "target_gain": SWEEP_TARGET_GAIN,
                  "selection": "per method: the (lr, checkpoint) of highest validation implicit accuracy",
                  "generator": generator, "seeds": per_seed, "aggregate": aggregate_sweep(per_seed),
                  "threads": torch.get_num_threads()}
        report["seconds_total"] = time.perf_counter() - t0
        (out / "sweep_report.json").write_text(json.dumps(report, indent=1))
        plot_sweep(report, out / "sweep_reward_vs_step.png")
        if progress:
            print(format_sweep_table(report), flush=True)
        return report
    finally:
        torch.set_num_threads(previous)


def aggregate_sweep(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Over seeds: the selected checkpoints' mean reward (mean ± std over seeds), gain, win rate, the lrs chosen,
    and the pairs/seconds to the target gain (seeds that reached it)."""
    agg: dict[str, Any] = {}
    for m in ("base", *METHODS):
        sel = [r["selected"][m] for r in per_seed]
        means = np.array([x["mean"] for x in sel])
        gains = means - np.array([r["selected"]["base"]["mean"] for r in per_seed])
        k = len(sel)
        agg[m] = {"mean": float(means.mean()), "std_over_seeds": float(means.std(ddof=1)) if k > 1 else 0.0,
                  "se_over_seeds": float(means.std(ddof=1) / math.sqrt(k)) if k > 1 else 0.0,
                  "gain_over_base": float(gains.mean()), "win_rate_vs_base": float(np.mean(
                      [x["win_rate_vs_base"] for x in sel])), "seeds": k}
        if m != "base":
            reached = [x["to_target_gain"] for x in sel if x["to_target_gain"] is not None]
            agg[m].update(lrs=[x["lr"] for x in sel], steps=[x["step"] for x in sel],
                          reached_target=f"{len(reached)}/{k}",
                          pairs_to_target=float(np.mean([x["pairs_seen"] for x in reached])) if reached else None,
                          seconds_to_target=float(np.mean([x["seconds"] for x in reached])) if reached else None)
    return agg


def format_sweep_table(report: dict[str, Any]) -> str:
    lines = []
    for r in report["seeds"]:
        lines.append(f"seed {r['seed']}: selected by validation implicit accuracy (reward ± s.e., win rate vs base)")
        for m in ("base", *METHODS):
            x = r["selected"][m]
            extra = "" if m == "base" else (f"  lr {x['lr']:g} step {x['step']} val_acc {x['val_implicit_acc']:.3f}"
                                            f"  to +{report['target_gain']}: " + (
                                                "not reached" if x["to_target_gain"] is None else
                                                f"{x['to_target_gain']['pairs_seen']} pairs, "
                                                f"{x['to_target_gain']['seconds']:.0f} s"))
            lines.append(f"  {LABELS[m]:<14} {x['mean']:>8.4f} ± {x['se']:.4f} {x['win_rate_vs_base']:>6.2f}{extra}")
    a = report["aggregate"]
    lines.append(f"over {len(report['seeds'])} seed(s) (mean ± s.e. over seeds)")
    for m in ("base", *METHODS):
        x = a[m]
        extra = "" if m == "base" else (f"  lrs {x['lrs']}  reached +{report['target_gain']}: {x['reached_target']}"
                                        + ("" if x["pairs_to_target"] is None else
                                           f" ({x['pairs_to_target']:.0f} pairs, {x['seconds_to_target']:.0f} s)"))
        lines.append(f"  {LABELS[m]:<14} {x['mean']:>8.4f} ± {x['se_over_seeds']:.4f} gain {x['gain_over_base']:+.4f}"
                     f" win {x['win_rate_vs_base']:.2f}{extra}")
    return "\n".join(lines)


def plot_sweep(report: dict[str, Any], path: Path) -> None:
    """Reward vs step, one panel per method, one line per lr (mean over seeds); the selected lrs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.2), dpi=100, sharey=True)
    for ax, m in zip(axes, METHODS, strict=True):
        for lr in report["lrs"]:
            curves = np.array([r["reward_vs_step"][m][_lr_key(lr)] for r in report["seeds"]])
            chosen = sum(r["selected"][m]["lr"] == lr for r in report["seeds"])
            ax.plot(curves[0, :, 0], curves[:, :, 1].mean(0), "o-",
                    label=f"lr {lr:g}" + (f" (selected {chosen}/{len(report['seeds'])})" if chosen else ""))
        ax.set_title(LABELS[m], fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean reward of samples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- CLI
def _cmd_demo(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.sweep and args.arch != "sd15":
        raise ValueError("--sweep runs the SD1.5 world only (no --arch sd3 sweep yet)")
    if args.sweep:
        run_sweep(args.out, quick=args.quick, seeds=args.seeds, progress=not args.no_progress, threads=args.threads)
    else:
        run_demo(args.out, quick=args.quick, seeds=args.seeds, progress=not args.no_progress, threads=args.threads,
                 arch=args.arch)
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="preference alignment on a CPU: SFT vs Diffusion-DPO vs DDIM-InPO on a synthetic world",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="the reduced version (~2 minutes; CI)")
    p.add_argument("--seeds", type=int, default=1, help="repeat the comparison (pairs, training, evaluation) "
                                                        "over N seeds and report mean and spread")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is "
                                                              "often faster on a busy machine)")
    p.add_argument("--sweep", action="store_true",
                   help="the fair comparison: every method over the same lr grid (3e-5, 1e-4, 3e-4), each selected "
                        "by validation implicit accuracy on held-out pairs; report in OUT/sweep_report.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--arch", choices=("sd15", "sd3"), default="sd15",
                   help="the generator: sd15 (UNet, DDIM; default) or sd3 (MM-DiT, flow matching: flow SFT, "
                        "Flow-DPO and InPO for flows, fastinpo's own extension)")
    p.set_defaults(func=_cmd_demo)
    return p
