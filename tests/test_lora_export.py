"""A LoRA export reproduces the trained policy in a stock diffusers pipeline for any rank and alpha: the file
format carries no alpha, so the adapter's scale alpha/r must be folded into the exported up-weights."""

from __future__ import annotations

import pytest
import torch

from fastinpo.models.export import export_policy
from tests.tolerances import assert_close_model_output


@pytest.mark.parametrize("rank,alpha", [(4, 16.0), (4, 4.0), (8, 2.0), (2, 3.0)])
def test_lora_export_reproduces_the_policy_in_a_stock_pipeline(tiny_pipelines, tmp_path, rank, alpha):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_pipelines["sd15"] / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 20])
    h = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        policy = unet(x, t, encoder_hidden_states=h).sample
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=h).sample
        unet.enable_adapters()
    export_policy(tmp_path / "export", unet, lora=True, arch="sd15")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd15"], safety_checker=None)
    pipe.load_lora_weights(tmp_path / "export" / "lora")
    with torch.no_grad():
        stock = pipe.unet(x, t, encoder_hidden_states=h).sample
    assert (policy - base).abs().max() > 1e-3  # the adapter changes the output: the check can fail
    # same weights, another module structure (peft layers built by the loader): float32 rounding only
    assert_close_model_output(stock, policy)
