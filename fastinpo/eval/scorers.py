"""Image scorers for evaluation, all built from LOCAL weight paths (nothing is downloaded).

The interface is one method: ``Scorer.score(images: list[PIL.Image], prompts: list[str]) -> torch.Tensor (n,)``,
higher is better. :class:`CallableScorer` plugs any ``fn(images, prompts) -> tensor`` in (the demo's toy reward,
a user's reward).

What each scorer computes, and with which model code:

- :class:`PickScore`: a transformers ``CLIPModel`` folder (``yuvalkirstain/PickScore_v1``) and the tokenizer and
  preprocessing config of its processor folder (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``);
  ``exp(logit_scale) * cos(image, text)``, as the PickScore repository computes it.
- :class:`HPSv2`: an open_clip ViT-H-14 checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``,
  ``{"state_dict": ...}``). open_clip cannot be imported here (it needs torchvision), so the open_clip state dict
  is mapped key by key onto transformers' ``CLIPModel``, which has the same architecture (pre-LN ViT with
  ``ln_pre``, class-token pooling after ``ln_post``, causal text transformer pooled at the end-of-text token, no
  bias in the projections); :func:`open_clip_to_transformers`. The tokenizer is the standard CLIP BPE shipped in
  the open-clip-torch wheel. Score: ``cos(image, text)`` (HPSv2's ``image_features @ text_features.T``),
  images resized longest-side-to-224 and zero-padded to a square as HPSv2's ``preprocess_val`` does.
- :class:`ImageRewardScorer`: ``ImageReward.pt`` + ``med_config.json`` + a local ``bert-base-uncased`` tokenizer
  folder. BLIP's ViT and its BERT-with-cross-attention text encoder are mapped onto transformers'
  ``BlipVisionModel`` / ``BlipTextModel`` (ports of the same BLIP code); the score is
  ``(MLP(text_cls) - 0.16717362830052426) / 1.0333394966054072`` as ``ImageReward.score``.
- :class:`AestheticScorer`: the LAION improved-aesthetic-predictor head (``sac+logos+ava1-l14-linearMSE.pth``)
  on the L2-normalised CLIP ViT-L/14 image embedding (a transformers CLIP folder, e.g.
  ``openai/clip-vit-large-patch14``, or an open_clip checkpoint).
- :class:`ClipScore`: ``100 * max(cos(image, text), 0)`` with a transformers CLIP folder or an open_clip
  checkpoint.

Image preprocessing is PIL + torch only (no torchvision): bicubic resize, center crop (or HPSv2's pad), CLIP
mean/std.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


# ----------------------------------------------------------------------------------------------- preprocessing
def preprocess(images: Sequence[Image.Image], size: int, *, mode: str = "crop", mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """PIL images -> ``(n, 3, size, size)`` float32, normalised.

    ``mode="crop"``: shorter side to ``size`` (bicubic; the longer side ``int(size * long / short)``), then a
    center crop — CLIP's / torchvision's ``Resize(size) + CenterCrop(size)`` on PIL images, with the same
    rounding. ``mode="pad"``: longer side to ``size`` (``round``), zero-padded to a square, centered — open_clip's
    ``ResizeMaxSize`` that HPSv2's ``preprocess_val`` uses.
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"preprocess mode must be 'crop' or 'pad', got {mode!r}")
    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        if mode == "crop":
            if (w <= h and w == size) or (h <= w and h == size):
                resized = img
            elif w <= h:
                resized = img.resize((size, int(size * h / w)), Image.BICUBIC)
            else:
                resized = img.resize((int(size * w / h), size), Image.BICUBIC)
            rw, rh = resized.size
            top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
            img = resized.crop((left, top, left + size, top + size))
        else:
            scale = size / float(max(w, h))
            if scale != 1.0:
                nh, nw = round(h * scale), round(w * scale)
                resized = img.resize((nw, nh), Image.BICUBIC)
                canvas = Image.new("RGB", (size, size), (0, 0, 0))
                canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
                img = canvas
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out.append(x.permute(2, 0, 1).float() / 255.0)
    batch = torch.stack(out)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - m) / s


# ----------------------------------------------------------------------------------------------- interface
class Scorer:
    """``score(images, prompts) -> (n,)`` tensor, higher is better. Subclasses implement ``_score_batch``;
    ``score`` splits the input into batches of ``batch_size``."""

    name = "scorer"
    batch_size = 16

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts (one prompt per image)")
        if not images:
            return torch.zeros(0, dtype=torch.float32)
        parts = [self._score_batch(list(images[i:i + self.batch_size]), list(prompts[i:i + self.batch_size]))
                 for i in range(0, len(images), self.batch_size)]
        return torch.cat([p.detach().float().cpu().reshape(-1) for p in parts])

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    __call__ = score


def pil_to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size PIL images -> ``(n, 3, H, W)`` uint8."""
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes {sorted(sizes)} cannot be stacked into one tensor")
    return torch.stack([torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                        .view(im.size[1], im.size[0], 3).permute(2, 0, 1) for im in images])


class CallableScorer(Scorer):
    """Adapter for a plain function ``fn(images, prompts) -> tensor/list (n,)``.

    ``images="pil"`` passes the PIL images; ``images="uint8"`` passes one ``(n, 3, H, W)`` uint8 tensor (the
    form of the demo's toy reward, :func:`fastinpo.demo.reward`).
    """

    def __init__(self, fn: Callable[[Any, list[str]], Any], name: str | None = None, batch_size: int = 16,
                 images: str = "pil"):
        if images not in ("pil", "uint8"):
            raise ValueError(f"CallableScorer images must be 'pil' or 'uint8', got {images!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        self.batch_size = batch_size
        self.images = images

    def _score_batch(self, images, prompts):
        arg = pil_to_uint8(images) if self.images == "uint8" else images
        out = torch.as_tensor(self.fn(arg, prompts), dtype=torch.float32).reshape(-1)
        if out.numel() != len(images):
            raise ValueError(f"{self.name}: the reward function returned {out.numel()} values for {len(images)} "
                             "images (expected one score per image)")
        return out


# ----------------------------------------------------------------------------------------------- open_clip format
def open_clip_config(config: str | Path | dict) -> dict:
    """An open_clip model config: a dict, a JSON file, or a name from the open-clip-torch wheel's
    ``model_configs`` (``"ViT-H-14"``, ``"ViT-L-14-quickgelu"``...), read without importing open_clip."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"open_clip config {path} does not exist")
        return json.loads(path.read_text())
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"open_clip config {config!r}: the named configs come from the open-clip-torch wheel "
                                "(pip install --no-deps open-clip-torch), or give a JSON file")
    cfg_path = Path(list(spec.submodule_search_locations)[0]) / "model_configs" / f"{config}.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"open_clip config {config!r} not found ({cfg_path} does not exist)")
    return json.loads(cfg_path.read_text())


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors from ``.safetensors`` or a torch file (``{"state_dict": ...}`` unwrapped, DDP's
    ``module.`` prefix stripped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path}: expected a state dict of tensors (or {{'state_dict': ...}})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _count_blocks(sd: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def _strict_load(module: torch.nn.Module, sd: dict, where: str) -> None:
    """``load_state_dict`` with one clear error listing what is missing and what is left over (buffers that
    transformers recomputes, such as ``position_ids``, may be absent)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("position_ids")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"{where}: state dict does not fit the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{where}: shape mismatch (key, checkpoint, model): {bad[:5]}")
    module.load_state_dict(sd, strict=False)


def open_clip_to_transformers(sd: dict[str, torch.Tensor], config: dict) -> Any:
    """Build a transformers ``CLIPModel`` holding an open_clip ViT CLIP state dict.

    Sizes come from the tensors; what a state dict cannot tell (head counts, activation) from the open_clip
    ``config``: vision heads ``width // head_width`` (``head_width`` 64 by default), text ``heads`` (8 by
    default), GELU unless ``quick_gelu``. Keys that have no counterpart (a different tower type) raise.
    """
    from transformers import CLIPConfig, CLIPModel

    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        raise ValueError("not an open_clip ViT CLIP state dict: expected keys 'visual.conv1.weight' and "
                         f"'token_embedding.weight' (got e.g. {sorted(sd)[:5]})")
    vcfg, tcfg = config.get("vision_cfg", {}), config.get("text_cfg", {})
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    v_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = int(round(math.sqrt(n_pos - 1)))
    image_size = grid * patch
    if grid * grid != n_pos - 1:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows: not 1 + a square grid of patches")
    if "image_size" in vcfg and int(vcfg["image_size"]) != image_size:
        raise ValueError(f"open_clip config says image_size {vcfg['image_size']} but the checkpoint's positional "
                         f"embedding is for {image_size} ({grid}x{grid} patches of {patch})")
    t_vocab, t_width = sd["token_embedding.weight"].shape
    t_layers = _count_blocks(sd, "transformer.resblocks.")
    context = sd["positional_embedding"].shape[0]
    embed_dim = sd["visual.proj"].shape[1]
    act = "quick_gelu" if config.get("quick_gelu", False) else "gelu"
    v_heads = v_width // int(vcfg.get("head_width", 64))
    t_heads = int(tcfg.get("heads", 8))
    clip_cfg = CLIPConfig(
        text_config=dict(vocab_size=t_vocab, hidden_size=t_width, num_hidden_layers=t_layers,
                         intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         num_attention_heads=t_heads, max_position_embeddings=context, hidden_act=act,
                         layer_norm_eps=1e-5, projection_dim=embed_dim,
                         # pool at the first end-of-text token (open_clip: argmax of ids, EOT has the top id)
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=v_width, num_hidden_layers=v_layers, image_size=image_size,
                           patch_size=patch, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"]
                           .shape[0], num_attention_heads=v_heads, hidden_act=act, layer_norm_eps=1e-5,
                           projection_dim=embed_dim),
        projection_dim=embed_dim)
    new: dict[str, torch.Tensor] = {}
    skipped_buffers = ("attn_mask",)

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            q, k, v = sd.pop(s + "attn.in_proj_weight").chunk(3)
            qb, kb, vb = sd.pop(s + "attn.in_proj_bias").chunk(3)
            for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
                new[d + f"self_attn.{name}.weight"], new[d + f"self_attn.{name}.bias"] = w, b
            for a, b_ in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                          ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for p in ("weight", "bias"):
                    new[d + f"{b_}.{p}"] = sd.pop(s + f"{a}.{p}")

    sd = dict(sd)
    blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.", v_layers)
    blocks("transformer.resblocks.", "text_model.encoder.layers.", t_layers)
    new["vision_model.embeddings.class_embedding"] = sd.pop("visual.class_embedding")
    new["vision_model.embeddings.position_embedding.weight"] = sd.pop("visual.positional_embedding")
    new["vision_model.embeddings.patch_embedding.weight"] = sd.pop("visual.conv1.weight")
    new["visual_projection.weight"] = sd.pop("visual.proj").t().contiguous()
    new["text_model.embeddings.token_embedding.weight"] = sd.pop("token_embedding.weight")
    new["text_model.embeddings.position_embedding.weight"] = sd.pop("positional_embedding")
    new["text_projection.weight"] = sd.pop("text_projection").t().contiguous()
    new["logit_scale"] = sd.pop("logit_scale").reshape(())
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            new[f"{b}.{p}"] = sd.pop(f"{a}.{p}")
    leftover = [k for k in sd if k.split(".")[-1] not in skipped_buffers]
    if leftover:
        raise ValueError(f"open_clip state dict has keys with no CLIP ViT counterpart: {leftover[:8]} (only the "
                         "standard ViT image tower + transformer text tower are supported)")
    model = CLIPModel(clip_cfg)
    _strict_load(model, {k: v.float() for k, v in new.items()}, "open_clip -> CLIPModel")
    return model.eval()


def _clip_tokenizer():
    """The standard CLIP tokenizer (BPE from the open-clip-torch wheel), as open_clip's models use."""
    from fastinpo.models.sd import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as d:
        return write_clip_tokenizer(d)


# ----------------------------------------------------------------------------------------------- CLIP backbone
class ClipBackbone:
    """A transformers ``CLIPModel`` with its tokenizer and image preprocessing: L2-normalised image and text
    embeddings. Built from a transformers folder (:meth:`from_transformers`) or an open_clip checkpoint
    (:meth:`from_open_clip`)."""

    def __init__(self, model, tokenizer, *, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, resize: str = "crop",
                 pad_to_context: bool = False, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std, self.resize = image_size, tuple(mean), tuple(std), resize
        self.pad_to_context = pad_to_context  # open_clip tokenizes to a fixed 77 tokens
        self.context_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_transformers(cls, folder: str | Path, processor: str | Path | None = None, **kw) -> ClipBackbone:
        """``folder``: a ``CLIPModel`` (config.json + weights); ``processor``: the folder with the tokenizer and
        ``preprocessor_config.json`` (default: ``folder``)."""
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        proc = Path(processor) if processor is not None else folder
        for path, what in ((folder / "config.json", "a transformers CLIP model folder (config.json)"),
                           (proc, "a processor folder (tokenizer + preprocessor_config.json)")):
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: expected {what}")
        if not any((proc / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise FileNotFoundError(f"{proc} has no CLIP tokenizer (vocab.json / tokenizer.json): give the processor "
                                    "folder (for PickScore: CLIP-ViT-H-14-laion2B-s32B-b79K)")
        model = CLIPModel.from_pretrained(folder)
        tokenizer = CLIPTokenizer.from_pretrained(proc)
        pre = json.loads((proc / "preprocessor_config.json").read_text()) if (
            proc / "preprocessor_config.json").is_file() else {}
        crop = pre.get("crop_size", model.config.vision_config.image_size)
        size = crop.get("height", crop) if isinstance(crop, dict) else crop
        return cls(model, tokenizer, image_size=int(size), mean=pre.get("image_mean", CLIP_MEAN),
                   std=pre.get("image_std", CLIP_STD), **kw)

    @classmethod
    def from_open_clip(cls, path: str | Path, config: str | Path | dict = "ViT-H-14", *, resize: str = "crop",
                       **kw) -> ClipBackbone:
        cfg = open_clip_config(config)
        model = open_clip_to_transformers(load_state_dict(path), cfg)
        vcfg = cfg.get("vision_cfg", {})
        return cls(model, _clip_tokenizer(), image_size=model.config.vision_config.image_size,
                   mean=vcfg.get("image_mean", CLIP_MEAN), std=vcfg.get("image_std", CLIP_STD), resize=resize,
                   pad_to_context=True, **kw)

    @classmethod
    def from_path(cls, path: str | Path, *, open_clip_config_name: str | Path | dict = "ViT-L-14",
                  processor: str | Path | None = None, **kw) -> ClipBackbone:
        """A folder is a transformers CLIP; a file an open_clip checkpoint."""
        path = Path(path)
        if path.is_dir():
            return cls.from_transformers(path, processor, **kw)
        return cls.from_open_clip(path, open_clip_config_name, **kw)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = preprocess(images, self.image_size, mode=self.resize, mean=self.mean, std=self.std)
        return self.image_features_from_pixels(pixels)

    @torch.no_grad()
    def image_features_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        # vision_model + visual_projection rather than get_image_features, whose return type changed in
        # transformers 5 (a ModelOutput instead of a tensor)
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        feats = self.model.visual_projection(pooled).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(prompts), padding="max_length" if self.pad_to_context else True, truncation=True,
                              max_length=self.context_length, return_tensors="pt")

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenize(prompts)
        # the text tower is causal and pools at the end-of-text token, so padding after it cannot change the
        # feature; open_clip passes no padding mask, PickScore's processor passes one: both give the same result
        kwargs = {} if self.pad_to_context else {"attention_mask": tok["attention_mask"].to(self.device)}
        pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device), **kwargs).pooler_output
        feats = self.model.text_projection(pooled).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def cosine(self, images, prompts) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


# ----------------------------------------------------------------------------------------------- the scorers
class PickScore(Scorer):
    """PickScore v1: ``exp(logit_scale) * cos`` with a CLIP-H in transformers format."""

    name = "pickscore"

    def __init__(self, model_folder: str | Path, processor_folder: str | Path | None = None, *,
                 device="cpu", dtype=torch.float32, batch_size: int = 16):
        self.clip = ClipBackbone.from_transformers(model_folder, processor_folder, device=device, dtype=dtype)
        self.batch_size = batch_size

    def _score_batch(self, images, prompts):
        return self.clip.model.logit_scale.exp().float().cpu() * self.clip.cosine(images, prompts).cpu()


class HPSv2(Scorer):
    """HPSv2 / v2.1: ``cos(image, text)`` of the fine-tuned open_clip ViT-H-14 (images padded to a square)."""

    name = "hpsv2"

    def __init__(self, checkpoint: str | Path, config: str | Path | dict = "ViT-H-14", *, device="cpu",
                 dtype=torch.float32, batch_size: int = 16):
        self.clip = ClipBackbone.from_open_clip(checkpoint, config, resize="pad", device=device, dtype=dtype)
        self.batch_size = batch_size

    def _score_batch(self, images, prompts):
        return self.clip.cosine(images, prompts)


class ClipScore(Scorer):
    """CLIP score ``100 * max(cos, 0)`` (torchmetrics' definition)."""

    name = "clip"

    def __init__(self, path: str | Path, *, open_clip_config_name: str | Path | dict = "ViT-L-14",
                 processor: str | Path | None = None, device="cpu", dtype=torch.float32, batch_size: int = 16):
        self.clip = ClipBackbone.from_path(path, open_clip_config_name=open_clip_config_name, processor=processor,
                                           device=device, dtype=dtype)
        self.batch_size = batch_size

    def _score_batch(self, images, prompts):
        return 100.0 * self.clip.cosine(images, prompts).clamp(min=0)


def linear_head(sd: dict[str, torch.Tensor], where: str) -> torch.nn.Sequential:
    """The ``layers.{i}`` Linear/Dropout stack of the LAION aesthetic head and ImageReward's MLP, rebuilt from the
    state dict: Linear at each indexed ``weight``, Dropout (identity in eval) in the gaps, as the originals."""
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.endswith(".weight")})
    if not idx:
        raise ValueError(f"{where}: expected an MLP state dict with keys 'layers.<i>.weight' (LAION aesthetic / "
                         f"ImageReward head), got {sorted(sd)[:6]}")
    modules: list[torch.nn.Module] = []
    for i in range(idx[-1] + 1):
        if i in idx:
            out_f, in_f = sd[f"layers.{i}.weight"].shape
            modules.append(torch.nn.Linear(in_f, out_f))
        else:
            modules.append(torch.nn.Dropout(0.0))
    head = torch.nn.Sequential(*modules)
    _strict_load(torch.nn.ModuleDict({"layers": head}), {k: v.float() for k, v in sd.items()}, where)
    return head.eval()


class AestheticScorer(Scorer):
    """LAION aesthetic predictor v2: the MLP head on the L2-normalised CLIP ViT-L/14 image embedding."""

    name = "aesthetic"

    def __init__(self, head: str | Path, clip: str | Path, *, open_clip_config_name: str | Path | dict = "ViT-L-14",
                 device="cpu", dtype=torch.float32, batch_size: int = 16):
        self.clip = ClipBackbone.from_path(clip, open_clip_config_name=open_clip_config_name, device=device,
                                           dtype=dtype)
        self.head = linear_head(load_state_dict(head), f"aesthetic head {head}").to(self.clip.device)
        in_f = self.head[0].in_features
        dim = int(self.clip.model.config.projection_dim)
        if in_f != dim:
            raise ValueError(f"aesthetic head {head} takes {in_f}-d embeddings but the CLIP model gives {dim}-d "
                             "(the LAION v2 head needs CLIP ViT-L/14, 768-d)")
        self.batch_size = batch_size

    @torch.no_grad()
    def _score_batch(self, images, prompts):
        return self.head(self.clip.image_features(images)).reshape(-1)


class ImageRewardScorer(Scorer):
    """ImageReward v1.0: BLIP ViT image tokens -> BERT with cross-attention over them -> [CLS] -> MLP,
    normalised with ImageReward's mean/std."""

    name = "imagereward"

    def __init__(self, checkpoint: str | Path, med_config: str | Path, tokenizer: str | Path, *,
                 vision_heads: int | None = None, device="cpu", dtype=torch.float32, batch_size: int = 16):
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        sd = load_state_dict(checkpoint)
        med_path = Path(med_config)
        if not med_path.is_file():
            raise FileNotFoundError(f"ImageReward med_config {med_path} does not exist (ImageReward's med_config.json)")
        med = json.loads(med_path.read_text())
        self.vision, self.text = blip_from_imagereward(sd, med, vision_heads=vision_heads)
        self.vision.to(self.device, dtype)
        self.text.to(self.device, dtype)
        self.mlp = linear_head({k[len("mlp."):]: v for k, v in sd.items() if k.startswith("mlp.")},
                               f"ImageReward MLP in {checkpoint}").to(self.device)
        self.tokenizer = imagereward_tokenizer(tokenizer)
        self.image_size = int(self.vision.config.image_size)

    @torch.no_grad()
    def _score_batch(self, images, prompts):
        pixels = preprocess(images, self.image_size).to(self.device, self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt")
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(input_ids=tok["input_ids"].to(self.device),
                        attention_mask=tok["attention_mask"].to(self.device), encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts)
        reward = self.mlp(out.last_hidden_state[:, 0, :].float()).reshape(-1)
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def imagereward_tokenizer(folder: str | Path):
    """``bert-base-uncased``'s tokenizer with the two tokens BLIP adds (``[DEC]`` as bos, ``[ENC]``), as
    ImageReward's ``init_tokenizer``."""
    from transformers import BertTokenizer

    folder = Path(folder)
    if not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"{folder} is not a BERT tokenizer folder (no vocab.txt): ImageReward needs a local "
                                "copy of bert-base-uncased's tokenizer")
    tok = BertTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def blip_from_imagereward(sd: dict[str, torch.Tensor], med: dict, *, vision_heads: int | None = None):
    """ImageReward's ``blip.visual_encoder`` (BLIP's timm-style ViT) and ``blip.text_encoder`` (BLIP's med.py
    BERT) as transformers ``BlipVisionModel`` and ``BlipTextModel``. ViT sizes come from the tensors, heads
    ``width // 64`` unless given (ViT-L: 16); the text config from ``med_config.json`` (its ``encoder_width`` is
    replaced by the ViT width, as BLIP does)."""
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    v = {k[len("blip.visual_encoder."):]: t for k, t in sd.items() if k.startswith("blip.visual_encoder.")}
    t = {k[len("blip.text_encoder."):]: x for k, x in sd.items() if k.startswith("blip.text_encoder.")}
    if not v or not t:
        raise ValueError("not an ImageReward checkpoint: expected keys 'blip.visual_encoder.*' and "
                         f"'blip.text_encoder.*' (got e.g. {sorted(sd)[:5]})")
    width, _, patch, _ = v["patch_embed.proj.weight"].shape
    n_pos = v["pos_embed"].shape[1]
    grid = int(round(math.sqrt(n_pos - 1)))
    layers = _count_blocks(v, "blocks.")
    vcfg = BlipVisionConfig(hidden_size=width, intermediate_size=v["blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=vision_heads or width // 64,
                            image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)
    new_v = {"embeddings.class_embedding": v.pop("cls_token"), "embeddings.position_embedding": v.pop("pos_embed"),
             "embeddings.patch_embedding.weight": v.pop("patch_embed.proj.weight"),
             "embeddings.patch_embedding.bias": v.pop("patch_embed.proj.bias"),
             "post_layernorm.weight": v.pop("norm.weight"), "post_layernorm.bias": v.pop("norm.bias")}
    for i in range(layers):
        for a, b in (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                     ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                new_v[f"encoder.layers.{i}.{b}.{p}"] = v.pop(f"blocks.{i}.{a}.{p}")
    if v:
        raise ValueError(f"ImageReward visual encoder has keys with no BLIP ViT counterpart: {sorted(v)[:8]}")
    vision = BlipVisionModel(vcfg)
    _strict_load(vision, {k: x.float() for k, x in new_v.items()}, "ImageReward visual encoder")

    tcfg = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                          encoder_hidden_size=width, intermediate_size=med["intermediate_size"],
                          num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                          max_position_embeddings=med["max_position_embeddings"],
                          hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
                          pad_token_id=med.get("pad_token_id", 0), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    text = BlipTextModel(tcfg, add_pooling_layer=False)
    t = {k: x for k, x in t.items() if not k.endswith("position_ids")}
    _strict_load(text, {k: x.float() for k, x in t.items()}, "ImageReward text encoder")
    return vision.eval(), text.eval()


SCORER_NAMES = ("pickscore", "hpsv2", "imagereward", "aesthetic", "clip")
