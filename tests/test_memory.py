"""Memory users can turn down (issue 15 item 2): a LoRA run's frozen base denoiser in ``model.base_dtype``
(half the bytes in bfloat16/float16) while the trainable adapters stay float32; the key is refused where it has no
meaning (full fine-tuning trains the base; without the matching autocast float32 activations would meet
half-precision weights; DeepSpeed sets the module's dtype itself), and a LoRA trained on a half-precision base
exports float32 adapters that a stock float32 pipeline loads. The step-1 ln 2 invariant with a half-precision
base is in tests/test_precision.py."""

from __future__ import annotations

import pytest
import torch

from fastinpo.config import load_config
from fastinpo.train.models import base_weight_dtype, conv_factored_adafactor, prepare_policy
from tests.tolerances import assert_close_model_output

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # base_weight_dtype only reads the device type


def _config(*over: str):
    return load_config(None, ["model.path=unused", "data.path=unused", "train.device=cpu", *over])


@pytest.mark.parametrize("over,device,expected", [
    (["lora.rank=4", "train.mixed_precision=bf16"], CUDA, torch.bfloat16),   # auto: the autocast dtype on CUDA
    (["lora.rank=4", "train.mixed_precision=fp16"], CUDA, torch.float16),
    (["lora.rank=4", "train.mixed_precision=no"], CUDA, torch.float32),
    (["lora.rank=4", "train.mixed_precision=bf16"], CPU, torch.float32),     # auto: float32 on a CPU
    (["lora.rank=4", "train.mixed_precision=bf16", "model.base_dtype=bfloat16"], CPU, torch.bfloat16),
    (["lora.rank=4", "train.mixed_precision=bf16", "model.base_dtype=float32"], CUDA, torch.float32),
    (["train.mixed_precision=bf16"], CUDA, torch.float32),                   # full fine-tuning: the base trains
])
def test_base_weight_dtype(over, device, expected):
    assert base_weight_dtype(_config(*over), device) == expected


@pytest.mark.parametrize("over,message", [
    (["model.base_dtype=bfloat16", "train.mixed_precision=bf16"], "is for LoRA"),
    (["model.base_dtype=bfloat16", "lora.rank=4"], "needs train.mixed_precision = 'bf16'"),
    (["model.base_dtype=float16", "lora.rank=4", "train.mixed_precision=bf16"], "needs train.mixed_precision = 'fp16'"),
    (["model.base_dtype=bfloat16", "lora.rank=4", "train.mixed_precision=bf16", "distributed.backend=deepspeed"],
     "DeepSpeed holds the whole module"),
    (["model.base_dtype=float32", "lora.rank=4", "distributed.backend=deepspeed"], "leave model.base_dtype = 'auto'"),
])
def test_base_dtype_refused_where_it_has_no_meaning(over, message):
    with pytest.raises(ValueError, match="model.base_dtype") as err:
        _config(*over)
    assert message in str(err.value)


def _frozen_and_trainable(unet):
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    trainable = [p for p in unet.parameters() if p.requires_grad]
    return frozen, trainable


@pytest.mark.parametrize("base,amp,dtype", [("bfloat16", "bf16", torch.bfloat16), ("float16", "fp16", torch.float16)])
def test_half_precision_lora_base_halves_the_frozen_bytes(tiny_pipelines, base, amp, dtype):
    from diffusers import UNet2DConditionModel

    def build(*over):
        unet = UNet2DConditionModel.from_pretrained(tiny_pipelines["sdxl"] / "unet")
        return prepare_policy(_config("lora.rank=4", *over), unet, CPU)[0]

    full_precision = build(f"train.mixed_precision={amp}")  # auto on a CPU: float32
    half = build(f"train.mixed_precision={amp}", f"model.base_dtype={base}")
    frozen32, trainable32 = _frozen_and_trainable(full_precision)
    frozen, trainable = _frozen_and_trainable(half)
    assert {p.dtype for p in frozen32} == {torch.float32}
    assert {p.dtype for p in frozen} == {dtype}
    assert {p.dtype for p in trainable} == {torch.float32}  # adapters, their grads and optimizer state: float32
    assert len(trainable) == len(trainable32) > 0
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    assert nbytes(frozen) * 2 == nbytes(frozen32)
    # the base is the float32 base rounded once; the adapters are peft's init rounded to the base dtype (as peft
    # creates them on a base loaded in that dtype, so a seed gives the same adapters however the base was loaded)
    for p32, p in zip(frozen32, frozen, strict=True):
        assert torch.equal(p32.to(dtype), p)
    for p32, p in zip(trainable32, trainable, strict=True):
        assert torch.equal(p32.to(dtype).float(), p)
    loaded_half = UNet2DConditionModel.from_pretrained(tiny_pipelines["sdxl"] / "unet", torch_dtype=dtype)
    loaded_half = prepare_policy(_config("lora.rank=4", f"train.mixed_precision={amp}", f"model.base_dtype={base}"),
                                 loaded_half, CPU)[0]
    for p, q in zip(half.parameters(), loaded_half.parameters(), strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q)


def test_lora_trained_on_a_half_precision_base_exports_for_a_stock_pipeline(tiny_pipelines, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from fastinpo.models.export import export_policy

    folder = tiny_pipelines["sd15"]

    def build(*over):
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        return prepare_policy(_config("lora.rank=4", "train.mixed_precision=bf16", *over), unet, CPU)[0]

    policy = build("model.base_dtype=bfloat16")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    export_policy(tmp_path / "export", policy, lora=True, arch="sd15")
    exported = load_file(tmp_path / "export" / "lora" / "pytorch_lora_weights.safetensors")
    assert exported and {t.dtype for t in exported.values()} == {torch.float32}

    # the same adapters on a float32 base, evaluated in float32: what a stock float32 pipeline must reproduce
    expected_unet = build("model.base_dtype=float32")
    trained = dict(policy.named_parameters())
    with torch.no_grad():
        for name, p in expected_unet.named_parameters():
            if p.requires_grad:
                p.copy_(trained[name])
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 20])
    h = torch.randn(2, 77, expected_unet.config.cross_attention_dim, generator=g)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "export" / "lora")
    with torch.no_grad():
        expected = expected_unet(x, t, encoder_hidden_states=h).sample
        stock = pipe.unet(x, t, encoder_hidden_states=h).sample
        base = UNet2DConditionModel.from_pretrained(folder / "unet")(x, t, encoder_hidden_states=h).sample
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the output: the check can fail
    assert_close_model_output(stock, expected)


# ------------------------------------------------------------------------------------ Adafactor (issue 15 item 4)
def _adafactor_runs(params_a, params_b, steps=3, seed=0):
    from transformers.optimization import Adafactor

    from fastinpo.train.models import conv_factored_adafactor

    ours = conv_factored_adafactor(params_a, lr=1e-2, weight_decay=0.01)
    stock = Adafactor(params_b, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False,
                      weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for a, b in zip(params_a, params_b, strict=True):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.reshape(b.shape).clone()
        ours.step()
        stock.step()
    return ours, stock


def test_conv_factored_adafactor_is_transformers_adafactor_on_1d_and_2d_params():
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(12, 5, generator=g), torch.randn(7, generator=g)]
    ours_p = [torch.nn.Parameter(t.clone()) for t in init]
    stock_p = [torch.nn.Parameter(t.clone()) for t in init]
    _adafactor_runs(ours_p, stock_p)
    for a, b, t in zip(ours_p, stock_p, init, strict=True):
        assert not torch.equal(a, t)  # it moved: the comparison can fail
        assert torch.equal(a, b)  # the same code on the same tensors: bit-identical


def test_conv_factored_adafactor_factors_a_kernel_as_its_2d_matrix():
    g = torch.Generator().manual_seed(2)
    kernel = torch.randn(16, 8, 3, 3, generator=g)
    ours_p = [torch.nn.Parameter(kernel.clone())]
    stock_p = [torch.nn.Parameter(kernel.reshape(16, 72).clone())]  # transformers' Adafactor on the 2-D matrix
    ours, _ = _adafactor_runs(ours_p, stock_p)
    assert ours_p[0].shape == (16, 8, 3, 3) and ours_p[0].grad.shape == (16, 8, 3, 3)
    assert not torch.equal(ours_p[0], kernel)
    assert torch.equal(ours_p[0].reshape(16, 72), stock_p[0])
    state = ours.state[ours_p[0]]
    assert state["exp_avg_sq_row"].shape == (16,) and state["exp_avg_sq_col"].shape == (72,)


def test_adafactor_state_of_the_real_sd15_unet_on_meta():
    """The real SD1.5 UNet (meta device: shapes only, no memory): transformers' Adafactor keeps 1.83 GB of
    second moments (its 4-D conv kernels, factored over their last two dimensions only); factored as 2-D
    matrices they take 6 MB."""
    from transformers.optimization import Adafactor

    from fastinpo.models.full_size import build_unet
    from fastinpo.train.models import conv_factored_adafactor

    def state_bytes(make):
        params = list(build_unet("sd15", device="meta").parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = make(params)
        opt.step()
        return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))

    stock = state_bytes(lambda ps: Adafactor(ps, lr=1e-8, scale_parameter=False, relative_step=False,
                                             warmup_init=False))
    ours = state_bytes(lambda ps: conv_factored_adafactor(ps, lr=1e-8, weight_decay=0.0))
    assert 1.82e9 < stock < 1.84e9, stock
    assert ours < 0.01e9, ours


def test_an_adafactor_checkpoint_of_transformers_factoring_is_refused_with_the_way_forward():
    """A resume of an Adafactor checkpoint written before conv factoring (transformers' (out, in, kh) x (out, in, kw)
    moments) is refused at load, not at the first step with a KeyError; the optimizer's own state loads."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3)
    conv(torch.randn(1, 4, 8, 8)).square().mean().backward()
    old = Adafactor(conv.parameters(), lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
    old.step()
    new = conv_factored_adafactor(conv.parameters(), lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="cannot be converted exactly"):
        new.load_state_dict(old.state_dict())
    mine = conv_factored_adafactor(conv.parameters(), lr=1e-3, weight_decay=0.0)
    mine.step()
    assert mine.state[conv.weight]["exp_avg_sq_row"].shape == (6,)
    new.load_state_dict(mine.state_dict())
