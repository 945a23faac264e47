"""Scorers: each loading path on a tiny model of the real architecture, saved in the real checkpoint's on-disk
format, loaded back through the eval path; scores finite, deterministic and equal to a direct forward of the
in-memory model.

The HPSv2 / open_clip reference is open_clip's OWN ``CLIP`` class (from the installed open-clip-torch source):
``import open_clip`` fails here (its package ``__init__`` needs torchvision), so the fixture loads
``open_clip.model`` without the package ``__init__``, giving ``open_clip.utils`` a stand-in for its one
torchvision import (FrozenBatchNorm2d, unused by ViT models), and removes all of it from ``sys.modules`` after.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastinpo.eval import scorers as sc
from tests.tolerances import assert_close_fp32

EMBED = 16


def _images(n: int, seed: int = 0, size=(40, 30)) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


PROMPTS = ["a photo of a red cat", "an astronaut riding a horse", "a bowl of fruit, oil painting"]


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def open_clip_model_module():
    """open_clip's own ``model`` module, loaded without the torchvision-dependent package ``__init__``."""
    spec = importlib.util.find_spec("open_clip")
    # scripts/install.sh installs open-clip-torch (--no-deps): a missing install must fail, not skip
    assert spec is not None, "open-clip-torch is not installed (pip install --no-deps open-clip-torch)"
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k == "open_clip" or k.startswith("open_clip.")}
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = [str(root)]
    pkg.__spec__ = spec
    sys.modules["open_clip"] = pkg
    utils = types.ModuleType("open_clip.utils")
    utils.__file__ = str(root / "utils.py")
    src = (root / "utils.py").read_text().replace("from torchvision.ops.misc import FrozenBatchNorm2d",
                                                  "FrozenBatchNorm2d = None")
    exec(compile(src, str(root / "utils.py"), "exec"), utils.__dict__)
    sys.modules["open_clip.utils"] = utils
    try:
        yield importlib.import_module("open_clip.model")
    finally:
        for k in [k for k in sys.modules if k == "open_clip" or k.startswith("open_clip.")]:
            del sys.modules[k]
        sys.modules.update(saved)


TINY_OPEN_CLIP = {"embed_dim": EMBED,
                  "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 8, "patch_size": 14},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 4, "layers": 2}}


def _open_clip_model(module, cfg=TINY_OPEN_CLIP, seed=0):
    torch.manual_seed(seed)
    model = module.CLIP(**cfg, output_dict=True).eval()
    with torch.no_grad():  # open_clip initialises logit_scale to log(1/0.07); move it off so it is tested
        model.logit_scale.fill_(2.5)
    return model


def _open_clip_tokens(backbone, prompts):
    """What open_clip's tokenizer gives: BPE ids to the end-of-text token, then zeros, 77 long."""
    ids = backbone.tokenize(prompts)["input_ids"].clone()
    for row in ids:
        eot = int((row == 49407).nonzero()[0])
        row[eot + 1:] = 0
    return ids


def make_tiny_clip_folder(folder: Path):
    """A tiny transformers CLIPModel + tokenizer + preprocessor config, as PickScore / openai CLIP folders."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from fastinpo.models.sd import write_clip_tokenizer

    torch.manual_seed(1)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=28, patch_size=14, hidden_act="gelu"),
                     projection_dim=EMBED, logit_scale_init_value=2.3)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    return make_tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip"))


# ----------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_crop_matches_transformers_clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = _images(2, size=(50, 31)) + _images(1, seed=3, size=(23, 41))
    ours = sc.preprocess(images, 28)
    theirs = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})(
        images=images, return_tensors="pt")["pixel_values"]
    assert_close_fp32(ours, theirs, what="CLIP preprocessing vs transformers' PIL processor")


def test_preprocess_pad_is_resize_max_size():
    # a 2:1 image: resized to 28 x 14, pasted centered on black: rows 0..6 and 21..27 are black (normalised)
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    x = sc.preprocess([img], 28, mode="pad")
    black = (0 - torch.tensor(sc.CLIP_MEAN)) / torch.tensor(sc.CLIP_STD)
    white = (1 - torch.tensor(sc.CLIP_MEAN)) / torch.tensor(sc.CLIP_STD)
    assert_close_fp32(x[0, :, :7, :].mean((1, 2)), black, what="top padding")
    assert_close_fp32(x[0, :, 21:, :].mean((1, 2)), black, what="bottom padding")
    assert_close_fp32(x[0, :, 10, :].mean(1), white, what="image rows")
    # square images: pad and crop agree (HPSv2 scores generated squares exactly like a crop would)
    sq = _images(1, size=(56, 56))
    assert torch.equal(sc.preprocess(sq, 28, mode="pad"), sc.preprocess(sq, 28, mode="crop"))


# ----------------------------------------------------------------------------------------------- PickScore
def test_pickscore_matches_clipmodel_forward(tiny_clip_folder):
    folder, model = tiny_clip_folder
    scorer = sc.PickScore(folder, folder, batch_size=2)
    images = _images(3)
    got = scorer.score(images, PROMPTS)
    assert torch.isfinite(got).all()
    assert torch.equal(got, scorer.score(images, PROMPTS)), "scores must be deterministic"
    # direct forward: CLIPModel's logits_per_image = exp(logit_scale) * cos, diagonal = matching pairs
    tok = scorer.clip.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    pixel_values=sc.preprocess(images, 28))
    assert_close_fp32(got, out.logits_per_image.diagonal(), what="PickScore vs CLIPModel forward")
    # batch size does not change a score
    assert_close_fp32(sc.PickScore(folder, folder, batch_size=3).score(images, PROMPTS), got, what="batching")


def test_pickscore_missing_tokenizer_is_clear(tiny_clip_folder, tmp_path):
    folder, _ = tiny_clip_folder
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        sc.PickScore(folder, tmp_path)


# ----------------------------------------------------------------------------------------------- HPSv2 / open_clip
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_hpsv2_open_clip_checkpoint_matches_open_clip(open_clip_model_module, tmp_path, fmt):
    oc = _open_clip_model(open_clip_model_module)
    if fmt == "pt":  # HPS_v2_compressed.pt layout: {"state_dict": ...}
        path = tmp_path / "HPS_v2_compressed.pt"
        torch.save({"state_dict": oc.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(TINY_OPEN_CLIP))
    scorer = sc.HPSv2(path, cfg_path, batch_size=2)
    images = _images(3, size=(28, 28))
    got = scorer.score(images, PROMPTS)
    assert torch.isfinite(got).all()
    assert torch.equal(got, scorer.score(images, PROMPTS))
    with torch.no_grad():
        out = oc(sc.preprocess(images, 28, mode="pad"), _open_clip_tokens(scorer.clip, PROMPTS))
    expected = (out["image_features"] * out["text_features"]).sum(-1)  # HPSv2: diag(image @ text.T)
    assert_close_fp32(got, expected, what="HPSv2 via CLIPModel vs open_clip's CLIP")


def test_open_clip_quick_gelu_and_logit_scale(open_clip_model_module, tmp_path):
    cfg = {**TINY_OPEN_CLIP, "quick_gelu": True}  # OpenAI-trained CLIPs use QuickGELU
    torch.manual_seed(3)
    oc = open_clip_model_module.CLIP(**cfg, output_dict=True).eval()
    assert any(isinstance(m, open_clip_model_module.QuickGELU) for m in oc.modules())
    path = tmp_path / "clip.pt"
    torch.save(oc.state_dict(), path)
    scorer = sc.ClipScore(path, open_clip_config_name=cfg)
    images = _images(2, size=(28, 28))
    got = scorer.score(images, PROMPTS[:2])
    with torch.no_grad():
        out = oc(sc.preprocess(images, 28), _open_clip_tokens(scorer.clip, PROMPTS[:2]))
    cos = (out["image_features"] * out["text_features"]).sum(-1)
    assert_close_fp32(got, 100 * cos.clamp(min=0), what="CLIP score (open_clip, QuickGELU)")
    assert_close_fp32(scorer.clip.model.logit_scale, oc.logit_scale, what="logit_scale")


def test_open_clip_wrong_checkpoint_is_clear(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {"foo.weight": torch.ones(2)}}, path)
    with pytest.raises(ValueError, match="not an open_clip ViT CLIP state dict"):
        sc.HPSv2(path, TINY_OPEN_CLIP)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sc.HPSv2(tmp_path / "missing.pt")


def test_open_clip_named_config_comes_from_the_wheel():
    cfg = sc.open_clip_config("ViT-H-14")
    assert cfg["vision_cfg"]["width"] == 1280 and cfg["vision_cfg"]["head_width"] == 80
    with pytest.raises(FileNotFoundError, match="not found"):
        sc.open_clip_config("ViT-Nonexistent")


# ----------------------------------------------------------------------------------------------- CLIP score
def test_clip_score_transformers_folder(tiny_clip_folder):
    folder, model = tiny_clip_folder
    scorer = sc.ClipScore(folder)
    images = _images(3)
    got = scorer.score(images, PROMPTS)
    tok = scorer.clip.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**tok, pixel_values=sc.preprocess(images, 28))
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert_close_fp32(got, 100 * cos.clamp(min=0), what="CLIP score")
    assert (got >= 0).all()


# ----------------------------------------------------------------------------------------------- aesthetic
class _AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head, as its repository defines it."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_head_on_normalised_clip_embedding(tiny_clip_folder, tmp_path):
    folder, model = tiny_clip_folder
    torch.manual_seed(5)
    head = _AestheticMLP(EMBED).eval()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    scorer = sc.AestheticScorer(path, folder, batch_size=2)
    images = _images(3)
    got = scorer.score(images, PROMPTS)
    assert torch.isfinite(got).all() and torch.equal(got, scorer.score(images, PROMPTS))
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=sc.preprocess(images, 28)).pooler_output)
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).reshape(-1)
    assert_close_fp32(got, expected, what="aesthetic score")


def test_aesthetic_head_width_mismatch_is_clear(tiny_clip_folder, tmp_path):
    folder, _ = tiny_clip_folder
    path = tmp_path / "head.pth"
    torch.save(_AestheticMLP(768).state_dict(), path)
    with pytest.raises(ValueError, match="takes 768-d embeddings but the CLIP model gives 16-d"):
        sc.AestheticScorer(path, folder)


# ----------------------------------------------------------------------------------------------- ImageReward
def _blip_to_imagereward_keys(vision_sd, text_sd, mlp_sd):
    """Write transformers BLIP weights under the key names of ImageReward.pt (BLIP's vit.py / med.py)."""
    out = {}
    for k, v in vision_sd.items():
        k2 = (k.replace("embeddings.class_embedding", "cls_token").replace("embeddings.position_embedding", "pos_embed")
              .replace("embeddings.patch_embedding", "patch_embed.proj").replace("post_layernorm", "norm")
              .replace("encoder.layers.", "blocks.").replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
              .replace("self_attn.qkv", "attn.qkv").replace("self_attn.projection", "attn.proj"))
        out["blip.visual_encoder." + k2] = v
    out.update({"blip.text_encoder." + k: v for k, v in text_sd.items()})
    out.update({"mlp." + k: v for k, v in mlp_sd.items()})
    out["blip.vision_proj.weight"] = torch.zeros(4, 32)  # in the real file, unused by the score
    return out


def test_imagereward_checkpoint_matches_blip_forward(tmp_path):
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "cat", "an", "astronaut",
             "riding", "horse", "bowl", "fruit", ",", "oil", "painting"]
    tok_dir = tmp_path / "bert-base-uncased"
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tok_dir / "vocab.txt")).save_pretrained(tok_dir)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 24, "initializer_range": 0.02, "intermediate_size": 48,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(words) + 2,
           "encoder_width": 32, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(7)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=16,
                                              layer_norm_eps=1e-6)).eval()
    text = BlipTextModel(BlipTextConfig(vocab_size=len(words) + 2, hidden_size=24, encoder_hidden_size=32,
                                        intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=64), add_pooling_layer=False).eval()
    with torch.no_grad():  # transformers' init (std 0.02) makes the tiny model ignore the image: widen it
        g = torch.Generator().manual_seed(11)
        for prm in [*vision.parameters(), *text.parameters()]:
            prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    mlp = _AestheticMLP(24).eval()  # ImageReward's MLP has the same layer layout
    torch.save(_blip_to_imagereward_keys(vision.state_dict(), text.state_dict(), mlp.state_dict()),
               tmp_path / "ImageReward.pt")
    scorer = sc.ImageRewardScorer(tmp_path / "ImageReward.pt", tmp_path / "med_config.json", tok_dir,
                                  vision_heads=2, batch_size=2)
    images = _images(3)
    got = scorer.score(images, PROMPTS)
    assert torch.isfinite(got).all() and torch.equal(got, scorer.score(images, PROMPTS))
    tok = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        emb = vision(pixel_values=sc.preprocess(images, 32)).last_hidden_state
        h = text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=emb,
                 encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long)).last_hidden_state
        expected = (mlp(h[:, 0]).reshape(-1) - sc.IMAGEREWARD_MEAN) / sc.IMAGEREWARD_STD
    assert_close_fp32(got, expected, what="ImageReward")
    # the image matters (cross-attention is wired): another image, another score
    assert not torch.equal(scorer.score(_images(1, seed=9), PROMPTS[:1]), got[:1])


def test_imagereward_needs_its_files(tmp_path):
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8)}, tmp_path / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match="med_config"):
        sc.ImageRewardScorer(tmp_path / "ImageReward.pt", tmp_path / "med_config.json", tmp_path)


# ----------------------------------------------------------------------------------------------- interface
def test_callable_scorer_and_length_checks():
    def reward(images, prompts):
        return [float(len(p)) for p in prompts]

    s = sc.CallableScorer(reward, batch_size=2)
    assert s.name == "reward"
    assert s.score(_images(3), PROMPTS).tolist() == [float(len(p)) for p in PROMPTS]
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        s.score(_images(3), PROMPTS[:2])
    # tensor-input rewards (the demo's form) get one (n, 3, H, W) uint8 tensor
    seen = []
    as_tensor = sc.CallableScorer(lambda x, p: seen.append(x) or x.float().mean((1, 2, 3)), images="uint8")
    imgs = _images(3)
    got = as_tensor.score(imgs, PROMPTS)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (3, 3, 30, 40)
    assert torch.equal(seen[0][1].permute(1, 2, 0), torch.from_numpy(np.asarray(imgs[1])))
    assert_close_fp32(got, seen[0].float().mean((1, 2, 3)), what="uint8 reward")
    bad = sc.CallableScorer(lambda images, prompts: [1.0], name="bad")
    with pytest.raises(ValueError, match="returned 1 values for 3 images"):
        bad.score(_images(3), PROMPTS)
