"""Real-size random SD1.5 and SDXL pipelines: the real architectures with random weights, nothing downloaded.

What a user without weights tries first, and what the GPU kit (scripts/gpu/run.sh) measures and trains on: the UNet,
VAE and CLIP text encoder configurations of Stable Diffusion 1.5 and SDXL base 1.0, written here from their public
config files (the architecture fields; nothing else of them is used), with the standard CLIP tokenizer and the SD
noise schedule, saved in the standard diffusers layout (``model_index.json``: a stock diffusers pipeline loads the
folder). Sizes: the SD1.5 UNet has 859.5 M parameters, the SDXL UNet 2.567 B (about 5.1 GB in bf16, 10.3 GB in
float32), the SDXL text encoders 123 M + 695 M, the VAE 83.7 M.

Each part is built, written and freed in turn (peak memory: the largest part once), on ``device`` (``"cuda"``
builds in seconds what takes minutes on a CPU; ``"meta"`` builds without memory, for parameter counts) and stored in
``dtype``. The weights are random under ``seed`` at PyTorch's default scale (the UNet through :func:`random_init`,
the others by their own init): the numbers the models compute are meaningless, the work (shapes, FLOPs, memory) is
the real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# The architecture fields of the public configs (runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`); every other field is diffusers' default.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# CLIP ViT-L/14 text tower (SD1.5's encoder, SDXL's first) and OpenCLIP ViT-bigG/14 (SDXL's second, projected)
CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
CLIP_COMMON: dict[str, Any] = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                   eos_token_id=49407, pad_token_id=49407)
SD_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
ARCHS = ("sd15", "sdxl")
RESOLUTION = {"sd15": 512, "sdxl": 1024}
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}
SDXL_UNET_PARAMETERS = 2_567_463_684  # the public SDXL base UNet's parameter count
SD15_UNET_PARAMETERS = 859_520_964


def unet_config(arch: str) -> dict[str, Any]:
    """The real UNet configuration of ``arch`` (``"sd15"`` or ``"sdxl"``)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return dict(SDXL_UNET if arch == "sdxl" else SD15_UNET)


def build_unet(arch: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0):
    """The real-size UNet of ``arch`` with random weights, built on ``device`` (``"meta"``: no memory).

    The module is built on the meta device and its storage allocated once in ``dtype`` on ``device``, then filled
    by :func:`random_init` (PyTorch's default init runs per layer in float32: about a minute for SD1.5 on one CPU
    core; the UNet holds no buffers, so nothing else needs computing)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(arch))
    if str(device) == "meta":
        return unet.to(dtype)
    unet = unet.to_empty(device=device).to(dtype)
    random_init(unet, seed)
    return unet


@torch.no_grad()
def random_init(module: torch.nn.Module, seed: int = 0) -> None:
    """PyTorch's default scale without its per-layer cost: every weight of 2+ dimensions uniform in
    ``±1/sqrt(fan_in)`` (what ``kaiming_uniform_(a=√5)`` gives linear and conv layers), biases uniform in the same
    bound, normalisation scales 1 and shifts 0."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            bound = 1.0 / max(1, p[0].numel()) ** 0.5
            p.uniform_(-bound, bound, generator=g)
            last_bound = bound
        elif "norm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:  # a bias: the bound of the weight it follows
            p.uniform_(-last_bound, last_bound, generator=g)


def _save(module, folder: Path, dtype: torch.dtype) -> None:
    module.to(dtype).save_pretrained(folder, safe_serialization=True)


def make_full_pipeline(out_dir: str | Path, arch: str = "sdxl", *, dtype: torch.dtype = torch.float32,
                       resolution: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
                       overwrite: bool = False) -> Path:
    """Write a real-size random SD1.5 or SDXL pipeline folder (diffusers layout) and return it.

    Args:
        out_dir: the folder (created; an existing non-empty one is refused unless ``overwrite``).
        arch: ``"sd15"`` or ``"sdxl"``.
        dtype: dtype of every stored weight (float32, float16 or bfloat16).
        resolution: the image resolution written into the VAE config (default 512 / 1024); the UNet and VAE
            weights do not depend on it.
        seed: seeds PyTorch's default initialisation.
        device: where each part is built before it is written (``"cuda"`` on a GPU machine: much faster).
        overwrite: replace the parts of an existing folder.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastinpo.models.sd import write_clip_tokenizer
    from fastinpo.ops.schedule import SD_SCHEDULER_CONFIG

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if str(device) == "meta":
        raise ValueError("a pipeline folder needs real weights: build on 'cpu' or 'cuda' (meta is for counting)")
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    resolution = resolution or RESOLUTION[arch]
    torch.manual_seed(seed)
    if str(device).startswith("cuda"):
        torch.cuda.manual_seed_all(seed)

    def text_encoder(cls, cfg: dict[str, Any]):
        with torch.device(device):
            return cls(CLIPTextConfig(**{**CLIP_COMMON, **cfg}))

    # one part at a time: peak memory is the largest part, not the pipeline
    _save(build_unet(arch, device=device, dtype=dtype, seed=seed), out / "unet", dtype)
    with torch.device(device):
        vae = AutoencoderKL(**SD_VAE, sample_size=resolution, scaling_factor=VAE_SCALING[arch],
                            force_upcast=arch == "sdxl")
    _save(vae, out / "vae", dtype)
    del vae
    if arch == "sdxl":  # SDXL's first encoder is read through its penultimate hidden states: no projection used
        _save(text_encoder(CLIPTextModel, CLIP_L), out / "text_encoder", dtype)
        _save(text_encoder(CLIPTextModelWithProjection, CLIP_BIGG), out / "text_encoder_2", dtype)
        write_clip_tokenizer(out / "tokenizer_2")
        scheduler = EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)
    else:
        _save(text_encoder(CLIPTextModel, CLIP_L), out / "text_encoder", dtype)
        scheduler = PNDMScheduler.from_config({**SD_SCHEDULER_CONFIG, "skip_prk_steps": True})
    write_clip_tokenizer(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    _write_model_index(out, arch, type(scheduler).__name__)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def _write_model_index(out: Path, arch: str, scheduler: str) -> None:
    """``model_index.json`` as ``save_pretrained`` of the stock pipeline writes it."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if arch == "sdxl":
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False,
                     image_encoder=[None, None])
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- SD3.5-medium
# The architecture fields of stabilityai/stable-diffusion-3.5-medium's `transformer/config.json` (MM-DiT-X: 24
# joint blocks of width 24 x 64, dual attention in the first 13, RMS q/k norm) and `vae/config.json` (16 latent
# channels, SD3's scale and shift); its text encoders are CLIP-L and CLIP-G with projection (T5-XXL is optional
# and not written: a T5-less folder is what StableDiffusion3Pipeline(text_encoder_3=None) runs).
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def build_sd3_transformer(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The SD3.5-medium ``SD3Transformer2DModel`` with random weights (``device="meta"``: no memory)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    if str(device) == "meta":
        return transformer.to(dtype)
    transformer = transformer.to_empty(device=device).to(dtype)
    random_init(transformer, seed)
    return transformer


def make_full_sd3_pipeline(out_dir: str | Path, *, dtype: torch.dtype = torch.float32, resolution: int = 1024,
                           seed: int = 0, device: str | torch.device = "cpu", overwrite: bool = False) -> Path:
    """Write a real-size random SD3.5-medium pipeline folder (no T5) in the diffusers layout; arguments as
    :func:`make_full_pipeline`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from fastinpo.models.sd import write_clip_tokenizer
    from fastinpo.models.sd3 import SD3_SCHEDULER_CONFIG

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if str(device) == "meta":
        raise ValueError("a pipeline folder needs real weights: build on 'cpu' or 'cuda' (meta is for counting)")
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _save(build_sd3_transformer(device=device, dtype=dtype, seed=seed), out / "transformer", dtype)
    with torch.device(device):
        vae = AutoencoderKL(**SD3_VAE, sample_size=resolution)
    _save(vae, out / "vae", dtype)
    del vae
    for sub, cfg in (("", CLIP_L), ("_2", CLIP_BIGG)):
        with torch.device(device):
            encoder = CLIPTextModelWithProjection(CLIPTextConfig(**{**CLIP_COMMON, **cfg}))
        _save(encoder, out / f"text_encoder{sub}", dtype)
        del encoder
        write_clip_tokenizer(out / f"tokenizer{sub}")
    FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    import diffusers

    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None], "image_encoder": [None, None],
             "feature_extractor": [None, None]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return out
