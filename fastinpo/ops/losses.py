"""The public loss functions and modules: validate the inputs, then dispatch (one dispatch point,
:mod:`fastinpo.ops.dispatch`) to the reference (:mod:`fastinpo.ops.reference`) or a fast path.

All paired tensors are ``(2B, ...)`` with winners first, then losers (Inversion-DPO: ``(N, 2B, ...)``). The losses
are differentiable with respect to the policy's predictions only; ``ref_pred``/``ref_preds``, ``target`` and
``weights`` are constants. A trainer that keeps winners and losers in separate ``(B, ...)`` tensors stacks them
once: ``diffusion_dpo_loss(torch.cat([pred_w, pred_l]), torch.cat([ref_w, ref_l]), torch.cat([tgt_w, tgt_l]), beta)``.

``loss_type`` picks the preference loss of the per-pair logits (SPEC §2): ``"sigmoid"`` (Diffusion-DPO, the
default), ``"hinge"`` or ``"ipo"`` — the three ``--loss_type`` choices of diffusers' SD1.5 DPO script.
"""

from __future__ import annotations

import torch
from torch import nn

from fastinpo.ops import checks, dispatch, reference
from fastinpo.ops.outputs import DPOLossOutput

dispatch.register("diffusion_dpo_loss", "reference", reference.diffusion_dpo_loss)
dispatch.register("inversion_dpo_loss", "reference", reference.inversion_dpo_loss)

#: the accepted ``loss_type`` values (SPEC §2; :func:`fastinpo.ops.reference.preference_loss`)
LOSS_TYPES = reference.LOSS_TYPES


def _check_loss_type(loss_type) -> str:
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}, got {loss_type!r}")
    return loss_type


def _with_loss_type(op: str, backend_name: str, fn):
    """The implementation the dispatcher picked, called with ``loss_type``.

    Every implementation takes ``loss_type`` as its last argument; the ``"triton"`` wrappers registered by
    ``fastinpo.kernels.registry`` predate it (four and five positional arguments), so for that backend the kernel
    module's entry point — which the wrapper only forwards to — is called directly. The backend is still the one
    the dispatcher chose.
    """
    if backend_name != "triton":
        return fn
    # plain import statements (not importlib): torch.compile(fullgraph=True) traces through them
    if op == "diffusion_dpo_loss":
        from fastinpo.kernels import dpo_loss

        return dpo_loss.diffusion_dpo_loss
    from fastinpo.kernels import inversion_dpo

    return inversion_dpo.inversion_dpo_loss


def _check_paired_preds(names: tuple[str, ...], values: tuple[torch.Tensor, ...], batch_dim: int) -> int:
    for name, value in zip(names, values, strict=False):
        checks.tensor(name, value)
    checks.same_shape(names, values)
    checks.same_device(names, values)
    if values[0].dim() < batch_dim + 2:
        raise ValueError(
            f"{names[0]} must have at least one dimension after the batch dimension "
            f"(per-sample data), got shape {tuple(values[0].shape)}"
        )
    return checks.paired(names[0], values[0], batch_dim=batch_dim)


def diffusion_dpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    *,
    loss_type: str = "sigmoid",
    backend: str | None = None,
) -> DPOLossOutput:
    """Diffusion-DPO loss (SPEC §2), the loss DDIM-InPO reuses with ``target = ε*``.

    ``m = mse(model_pred, target)``, ``r = mse(ref_pred, target)`` per sample (float32 accumulation),
    ``logits = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))``, and per pair
    ``"sigmoid"``: ``-logsigmoid(logits)``, ``"hinge"``: ``relu(1 - logits)``,
    ``"ipo"``: ``((logits - 1/2) / (beta/2))^2``; ``loss`` is their mean.

    Shapes: ``(2B, ...)``, the B winners first, then the B losers (pair b is rows b and B + b). With winners and
    losers in separate ``(B, ...)`` tensors: ``diffusion_dpo_loss(torch.cat([pred_w, pred_l]),
    torch.cat([ref_w, ref_l]), torch.cat([target_w, target_l]), beta)``.

    Args:
        model_pred: ``(2B, ...)`` policy prediction, winners first; the only input that gets a gradient.
        ref_pred: ``(2B, ...)`` reference prediction (any floating dtype, e.g. fp16).
        target: ``(2B, ...)`` the noise ε (or velocity, or InPO's ε*).
        beta: temperature > 0 (official: Diffusion-DPO 5000, InPO 2000 SD1.5 / 5000 SDXL), with SPEC's factor
            0.5: diffusers' SDXL script's ``beta_dpo`` is this β, its SD1.5 script's ``beta_dpo`` is β/2.
        loss_type: ``"sigmoid"`` (default), ``"hinge"`` or ``"ipo"``.
        backend: ``"reference"``, ``"triton"``, or ``None`` for the dispatcher's choice.

    Returns:
        :class:`DPOLossOutput` with ``loss`` (scalar), ``logits`` ``(B,)``, ``model_mse``/``ref_mse`` ``(2B,)``,
        ``implicit_acc`` (scalar).
    """
    names = ("model_pred", "ref_pred", "target")
    _check_paired_preds(names, (model_pred, ref_pred, target), batch_dim=0)
    beta = checks.positive_float("beta", beta)
    loss_type = _check_loss_type(loss_type)
    name, fn = dispatch.resolve("diffusion_dpo_loss", backend, (model_pred, ref_pred, target))
    return _with_loss_type("diffusion_dpo_loss", name, fn)(model_pred, ref_pred, target, beta, loss_type)


def inversion_dpo_loss(
    model_preds: torch.Tensor,
    ref_preds: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    *,
    flip_sign: bool = False,
    loss_type: str = "sigmoid",
    backend: str | None = None,
) -> DPOLossOutput:
    """Inversion-DPO loss (SPEC §4).

    ``D = (1/N) Σ_i w_i * mse(model_preds[i], ref_preds[i])`` per sample, ``logits = -0.5 * beta * (D_w - D_l)``
    (the paper's sign; ``flip_sign=True`` gives the released code's ``+``), ``loss = mean(-logsigmoid(logits))``
    (``loss_type="hinge"`` / ``"ipo"``: the same per-pair functions of the logits as :func:`diffusion_dpo_loss`).

    Args:
        model_preds: ``(N, 2B, C, H, W)`` policy ε (with CFG) at the N grid points, winners first along dim 1.
        ref_preds: ``(N, 2B, C, H, W)`` reference ε at the same points.
        weights: ``(N,)`` per-step weights ``w_i = 1 / (2 ᾱ_{t_i})`` (see :func:`fastinpo.inversion_dpo_grid`);
            the loss applies the ``1/N`` itself. Values must be finite and > 0 (checked: one small device sync on
            CUDA; :func:`inversion_dpo_loss_grid_weights` skips it for weights from a validated grid).
        beta: temperature > 0 (official 2000).
        flip_sign: use the released code's sign.
        loss_type: ``"sigmoid"`` (default, the paper's), ``"hinge"`` or ``"ipo"``.
        backend: ``"reference"``, ``"triton"``, or ``None`` for the dispatcher's choice.

    Returns:
        :class:`DPOLossOutput`; ``model_mse`` holds D ``(2B,)``, ``ref_mse`` zeros.
    """
    _check_weights_shape(model_preds, ref_preds, weights)
    # a value check reads the tensor (one small device sync on CUDA); training loops, whose weights come from a
    # validated grid, call inversion_dpo_loss_grid_weights instead
    bad = ~(torch.isfinite(weights) & (weights > 0))
    if bool(bad.any()):
        raise ValueError(f"weights must be finite and > 0 (w_i = 1 / (2 ᾱ_t_i), see inversion_dpo_grid), got values "
                         f"such as {weights[bad][:4].tolist()}")
    return inversion_dpo_loss_grid_weights(model_preds, ref_preds, weights, beta, flip_sign=flip_sign,
                                           loss_type=loss_type, backend=backend)


def _check_weights_shape(model_preds: torch.Tensor, ref_preds: torch.Tensor, weights: torch.Tensor) -> None:
    names = ("model_preds", "ref_preds")
    checks.tensor("model_preds", model_preds)
    if model_preds.dim() != 5:
        # a (2B, C, H, W) tensor without its step dimension would be read as N = 2B steps of C samples
        raise ValueError(f"model_preds must be (N, 2B, C, H, W): N trajectory steps of [winners; losers] latents, "
                         f"got shape {tuple(model_preds.shape)} (one step: add the step dimension, x[None])")
    _check_paired_preds(names, (model_preds, ref_preds), batch_dim=1)
    checks.tensor("weights", weights)
    N = model_preds.shape[0]
    if N == 0:
        raise ValueError("model_preds must hold at least one step (N >= 1), got N = 0")
    checks.per_sample_vector("weights", weights, N, model_preds.device)


def inversion_dpo_loss_grid_weights(model_preds: torch.Tensor, ref_preds: torch.Tensor, weights: torch.Tensor,
                                    beta: float, *, flip_sign: bool = False, loss_type: str = "sigmoid",
                                    backend: str | None = None) -> DPOLossOutput:
    """:func:`inversion_dpo_loss` with ``weights`` taken from :func:`fastinpo.inversion_dpo_grid` (finite and > 0
    because the schedule's ᾱ table was checked when it was built): the shapes are checked, the weights' values are
    not read, so a training step on CUDA makes no host sync here."""
    _check_weights_shape(model_preds, ref_preds, weights)
    if not isinstance(flip_sign, bool):
        raise TypeError(f"flip_sign must be a bool, got {type(flip_sign).__name__}")
    beta = checks.positive_float("beta", beta)
    loss_type = _check_loss_type(loss_type)
    name, fn = dispatch.resolve("inversion_dpo_loss", backend, (model_preds, ref_preds, weights))
    return _with_loss_type("inversion_dpo_loss", name, fn)(model_preds, ref_preds, weights, beta, flip_sign, loss_type)


def sft_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SFT-on-winners loss (SPEC §5): ``mean(mse(model_pred, target))`` over ``(n, ...)`` winners, float32 scalar."""
    names = ("model_pred", "target")
    for name, value in zip(names, (model_pred, target), strict=False):
        checks.tensor(name, value)
    checks.same_shape(names, (model_pred, target))
    checks.same_device(names, (model_pred, target))
    if model_pred.dim() < 2 or model_pred.shape[0] == 0:
        raise ValueError(f"model_pred must be (n, ...) with n >= 1 and per-sample data, got {tuple(model_pred.shape)}")
    return reference.sft_loss(model_pred, target)


def inpo_target(x_t: torch.Tensor, z0: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """The reparametrized DDIM-InPO target (SPEC §3): ``ε* = (x̃ - sqrt(ᾱ_t) z0) / sqrt(1 - ᾱ_t)``, float32.

    Args:
        x_t: ``(2B, ...)`` inverted latents ``x̃``.
        z0: ``(2B, ...)`` clean latents.
        alpha_t: ``(2B,)`` ᾱ of each sample's own sampled ``t`` (not of the level the inversion reached), in (0, 1).
    """
    names = ("x_t", "z0")
    for name, value in zip(names, (x_t, z0), strict=False):
        checks.tensor(name, value)
    checks.same_shape(names, (x_t, z0))
    checks.same_device(names, (x_t, z0))
    if x_t.dim() < 1 or x_t.shape[0] == 0:
        raise ValueError(f"x_t must be (n, ...) with n >= 1, got {tuple(x_t.shape)}")
    checks.per_sample_vector("alpha_t", alpha_t, x_t.shape[0], x_t.device)
    checks.alpha_range("alpha_t", alpha_t, allow_one=False)
    return reference.inpo_target(x_t, z0, alpha_t)


class DiffusionDPOLoss(nn.Module):
    """Module form of :func:`diffusion_dpo_loss`:
    ``DiffusionDPOLoss(beta, loss_type="sigmoid")(model_pred, ref_pred, target) -> DPOLossOutput``.

    Inputs ``(2B, ...)``, winners first (see :func:`diffusion_dpo_loss` for the shapes and the one-line recipe for
    separate winner/loser tensors); the output has the same fields as the function's.
    """

    def __init__(self, beta: float, loss_type: str = "sigmoid", *, backend: str | None = None):
        super().__init__()
        self.beta = checks.positive_float("beta", beta)
        self.loss_type = _check_loss_type(loss_type)
        dispatch.requested_backend(backend)  # fail early on a misspelt name
        self.backend = backend

    def forward(self, model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor) -> DPOLossOutput:
        return diffusion_dpo_loss(
            model_pred, ref_pred, target, self.beta, loss_type=self.loss_type, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, backend={self.backend!r}"


class InversionDPOLoss(nn.Module):
    """Module form of :func:`inversion_dpo_loss`:
    ``InversionDPOLoss(beta, flip_sign=False, loss_type="sigmoid")(model_preds, ref_preds, weights)``."""

    def __init__(
        self, beta: float, flip_sign: bool = False, loss_type: str = "sigmoid", *, backend: str | None = None
    ):
        super().__init__()
        self.beta = checks.positive_float("beta", beta)
        if not isinstance(flip_sign, bool):
            raise TypeError(f"flip_sign must be a bool, got {type(flip_sign).__name__}")
        self.flip_sign = flip_sign
        self.loss_type = _check_loss_type(loss_type)
        dispatch.requested_backend(backend)
        self.backend = backend

    def forward(self, model_preds: torch.Tensor, ref_preds: torch.Tensor, weights: torch.Tensor) -> DPOLossOutput:
        return inversion_dpo_loss(
            model_preds, ref_preds, weights, self.beta, flip_sign=self.flip_sign, loss_type=self.loss_type,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, flip_sign={self.flip_sign}, loss_type={self.loss_type!r}, backend={self.backend!r}"
