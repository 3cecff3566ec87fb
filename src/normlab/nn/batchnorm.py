"""Batch normalization written out by hand, numerically interchangeable with torch's.

The algorithm (Ioffe & Szegedy, 2015), per channel c:

* **training**: take the mini-batch mean ``mu`` and the *biased* variance ``var`` of channel c
  over every axis except the channel axis (N for ``(N, C)``, N and L for ``(N, C, L)``,
  N, H and W for ``(N, C, H, W)``); normalize ``x_hat = (x - mu) / sqrt(var + eps)``; output
  ``y = gamma * x_hat + beta``. Meanwhile the running estimates move towards the batch values:
  ``running = (1 - momentum) * running + momentum * batch_value``; the running variance uses
  the *unbiased* batch variance (divide by n - 1). ``momentum=None`` turns this into the plain
  cumulative average of all batches seen (factor ``1 / num_batches_tracked``).
* **evaluation**: the running estimates replace the batch statistics, so the layer becomes a
  fixed per-channel ``y = x * scale + shift``. That is why it can be folded into the preceding
  Linear/Conv (see ``normlab.nn.fold``). Without running estimates
  (``track_running_stats=False``) the batch statistics are used in evaluation too.

Where to read what:

* ``batch_norm`` -- the functional form (same arguments as ``torch.nn.functional.batch_norm``):
  chooses batch vs running statistics and updates the running estimates.
* ``_BatchNormFunction`` -- the training-mode forward and its closed-form backward.
* ``_BatchNormBase`` -- the module: parameters, buffers, momentum bookkeeping, state_dict
  compatibility; ``BatchNorm1d`` and ``BatchNorm2d`` only differ in the accepted input ranks.

No native batch-norm kernel is used anywhere: only sums, products and a reciprocal square root.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "batch_norm"]


def _reduce_dims(x: Tensor) -> int | tuple[int, ...]:
    """Every axis except the channel axis 1: statistics are per channel."""
    return 0 if x.dim() == 2 else (0, *range(2, x.dim()))


def _per_channel(v: Tensor | None, x: Tensor) -> Tensor | None:
    """A length-C vector shaped to broadcast along axis 1 of x: (C,), (C, 1) or (C, 1, 1).

    For (N, C) inputs the vector already has the right shape and is returned as is.
    """
    if v is None or x.dim() == 2:
        return v
    return v.view([-1] + [1] * (x.dim() - 2))


def _mul_add(x: Tensor, scale: Tensor, shift: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``x * scale + shift`` for per-channel ``scale`` and ``shift`` (see ``_per_channel``).

    Pure speed plumbing, the math is just the expression above. For (N, C) inputs the fused
    ``addcmul`` is fastest; when the vectors broadcast over trailing spatial axes, torch's CPU
    ``addcmul`` loses vectorization and a product followed by an in-place add is faster.
    """
    if shift is None:
        return torch.mul(x, scale, out=out)
    if x.dim() == 2:
        return torch.addcmul(shift, x, scale, out=out)
    return torch.mul(x, scale, out=out).add_(shift)


def _dtype_of(buffer: Tensor, value: Tensor) -> Tensor:
    """``value`` in ``buffer``'s dtype (buffers may be wider than a low-precision input)."""
    return value if value.dtype == buffer.dtype else value.to(buffer.dtype)


def _verify_batch_size(size: torch.Size) -> None:
    """A single value per channel has zero variance: normalizing it is meaningless."""
    values_per_channel = size[0]
    for extent in size[2:]:
        values_per_channel *= extent
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _move_towards(running: Tensor, batch_sum: Tensor, inv_count: float, momentum: float) -> None:
    """``running += momentum * (batch_sum * inv_count - running)``, in place.

    Written with ``alpha`` arguments: a Python-scalar operand costs a tensor conversion per op
    (``batch_sum * inv_count`` would be one more op, and a slower one), ``alpha`` does not.
    """
    batch_sum = _dtype_of(running, batch_sum)
    running.sub_(running, alpha=momentum).add_(batch_sum, alpha=momentum * inv_count)


class _BatchNormFunction(torch.autograd.Function):
    """Training-mode batch normalization with a hand-derived backward pass.

    Forward normalizes with the batch statistics and, like torch's native kernel, also moves
    the running estimates (when given) towards them, in place.

    Backward. Write ``g = gamma`` (1 without affine), ``s = 1 / sqrt(var + eps)``,
    ``x_hat = (x - mean) * s``, ``dy`` the incoming gradient and ``sum`` a per-channel sum
    over the ``n`` values of a channel. Because ``mean`` and ``var`` depend on every x of the
    channel, the chain rule through them collapses into two per-channel sums:

        d gamma = sum(dy * x_hat)          d beta = sum(dy)
        dx      = g * s / n * (n * dy - sum(dy) - x_hat * sum(dy * x_hat))

    Batch Renormalization (``renorm=(r_max, d_max)``, see ``normlab.nn.batch_renorm``) outputs
    ``g * (r * x_hat + d) + beta`` with per-channel ``r = clip(sigma_B / sigma, 1/r_max, r_max)``
    and ``d = clip((mean - running_mean) / sigma, -d_max, d_max)`` (``sigma`` from the running
    variance, taken before this batch updates it), both treated as constants in backward. That
    is the same formulas with ``g * r`` in place of ``g``, and
    ``d gamma = r * sum(dy * x_hat) + d * sum(dy)``.

    Memory: autograd on the plain forward ops would keep most intermediates of the graph; here
    we keep one activation-sized tensor, the centered input ``xc = x - mean``, plus ``s`` and
    ``g * s`` (C values each). ``x_hat`` is never stored: ``x_hat * sum(dy * x_hat)`` equals
    ``xc * s**2 * sum(dy * xc)``.

    Speed: on small activations (an MLP's (32, 32)) each tensor op costs more in dispatch than
    in arithmetic, and an op with a Python-scalar operand more still (the scalar becomes a
    tensor), so the per-channel arithmetic uses ``alpha=`` arguments where it can.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        renorm: tuple[float, float] | None = None,
    ) -> Tensor:
        # Per-channel quantities are length-C vectors; _per_channel lines them up with x.
        dims = _reduce_dims(x)
        n = x.numel() // x.shape[1]  # values per channel

        # sum * (1/n) rather than mean(): the same value, and torch's CPU sum kernel is faster.
        # (Not x - sum with alpha=1/n either: that broadcast kernel is slower than a plain sub.)
        mean = x.sum(dims).mul_(1.0 / n)
        xc = x - _per_channel(mean, x)  # centered input, kept for backward
        # Two-pass variance (center first, then square) is accurate even when |mean| >> std.
        # `out` is first scratch space for the squares, then receives the result: one fresh
        # activation-sized allocation fewer (fresh memory is costly on CPU).
        out = torch.mul(xc, xc)
        sum_sq = out.sum(dims)

        r_d = None
        if renorm is not None:  # needs the running estimates from before this batch
            r_d = _renorm_correction(mean, sum_sq, n, running_mean, running_var, eps, renorm)

        # Move the running estimates a fraction `momentum` of the way towards the batch values:
        # new = (1 - momentum) * old + momentum * batch. The population variance is estimated
        # without bias (divide by n - 1 instead of n).
        if running_mean is not None:
            running_mean.lerp_(_dtype_of(running_mean, mean), momentum)
        if running_var is not None:
            _move_towards(running_var, sum_sq, 1.0 / (n - 1), momentum)

        invstd = torch.rsqrt(sum_sq.mul_(1.0 / n).add_(eps))  # biased variance: divide by n
        scale = invstd if weight is None else invstd * weight  # g * s
        shift = bias
        if r_d is not None:
            r, d = r_d
            scale = scale * r
            d = d if weight is None else d * weight
            shift = d if bias is None else d + bias
        _mul_add(xc, _per_channel(scale, x), _per_channel(shift, x), out=out)

        ctx.save_for_backward(xc, invstd, scale, *(r_d or ()))
        ctx.dims, ctx.n = dims, n
        return out

    @staticmethod
    @once_differentiable  # double backward would need a graph of this backward: not provided
    def backward(
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None, None]:
        xc, invstd, scale, *r_d = ctx.saved_tensors
        dims, n = ctx.dims, ctx.n
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        sum_dy = grad_out.sum(dims)
        if need_bias:
            grad_bias = sum_dy
        if need_x or need_weight:
            # sum(dy * x_hat) = s * sum(dy * xc). The product buffer is reused for dx below.
            buffer = torch.mul(grad_out, xc)
            sum_dy_xhat = buffer.sum(dims).mul_(invstd)
            if need_weight:
                grad_weight = sum_dy_xhat
                if r_d:  # Batch Renorm: d gamma = r * sum(dy * x_hat) + d * sum(dy)
                    r, d = r_d
                    grad_weight = torch.addcmul(d * sum_dy, r, sum_dy_xhat)
            if need_x:
                # dx = k dy + xc * (-k s / n) sum(dy x_hat) + (-k / n) sum(dy),  with k = g * s
                minus_k_n = scale / -n
                xc_coef = (minus_k_n * invstd).mul_(sum_dy_xhat)
                const = minus_k_n.mul_(sum_dy)
                grad_x = _mul_add(
                    xc, _per_channel(xc_coef, xc), _per_channel(const, xc), out=buffer
                ).addcmul_(grad_out, _per_channel(scale, xc))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _renorm_correction(
    mean: Tensor,
    sum_sq: Tensor,
    n: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    renorm: tuple[float, float],
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's per-channel ``(r, d)`` (Ioffe 2017, Algorithm 1)."""
    if running_mean is None or running_var is None:
        raise ValueError("batch renormalization needs running estimates (track_running_stats)")
    r_max, d_max = renorm
    sigma = torch.sqrt(running_var + eps)
    batch_sigma = torch.sqrt(sum_sq / n + eps).to(sigma.dtype)
    r = (batch_sigma / sigma).clamp_(1.0 / r_max, r_max)
    d = ((mean.to(sigma.dtype) - running_mean) / sigma).clamp_(-d_max, d_max)
    return r.to(mean.dtype), d.to(mean.dtype)


def _normalize_with_running_stats(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Evaluation: fixed statistics make BN one per-channel multiply-add (autograd as usual)."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    return _mul_add(x, _per_channel(scale, x), _per_channel(shift, x))


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    renorm: tuple[float, float] | None = None,
) -> Tensor:
    """Batch normalization with the arguments and semantics of ``torch.nn.functional.batch_norm``.

    ``training=True`` normalizes with the batch statistics and, when running buffers are
    given, updates them in place with factor ``momentum``; ``training=False`` uses the
    running buffers, which must then be given. ``renorm=(r_max, d_max)`` makes training-mode
    normalization Batch Renormalization (see ``_BatchNormFunction``).
    """
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")

    if not training:
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        if running_var is None:
            raise RuntimeError("running_var must be defined in evaluation mode")
        return _normalize_with_running_stats(input, running_mean, running_var, weight, bias, eps)

    if input.numel() == 0:
        # Nothing to normalize and no statistics to learn from. Like torch, return an empty
        # tensor that is still connected to weight and bias (their gradients become zeros).
        out = input.clone()
        if weight is not None:
            out = out * _per_channel(weight, input)
        if bias is not None:
            out = out + _per_channel(bias, input)
        return out

    return _BatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, momentum, eps, renorm
    )


class _BatchNormBase(nn.Module):
    """Parameters, buffers and train/eval bookkeeping shared by BatchNorm1d and BatchNorm2d.

    Attribute, parameter and buffer names are torch's, so state_dicts move freely between
    ``torch.nn.BatchNorm*d`` and these classes (in both directions).
    """

    # Version 2 of torch's format introduced `num_batches_tracked`; see _load_from_state_dict.
    _version = 2
    batch_dependent = True  # training statistics come from the whole batch (normlab.nn.traits)

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats

        # gamma ("weight") and beta ("bias"): let the network undo the normalization if useful.
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

        # Buffers are saved in the state_dict and moved by .to(), but not trained by gradients.
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Forget the running estimates: mean 0, variance 1, no batch seen."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Running estimates reset, gamma = 1, beta = 0: the layer starts as pure normalization."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints written before version 2 have no num_batches_tracked. Like torch, keep
        # the current counter (0 for a fresh module) instead of reporting a missing key.
        version = local_metadata.get("version")
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                current = self.num_batches_tracked
                usable = current is not None and current.device != torch.device("meta")
                state_dict[key] = current if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)

        # Factor of the running-estimate update. momentum=None: cumulative average, i.e. the
        # k-th batch gets weight 1/k, which makes the estimate the mean over all k batches.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)

        # Batch statistics in training, and in evaluation when there are no running buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers go in only when they are to be updated (training with tracking) or used (eval).
        # So a module whose track_running_stats was switched off after construction stops
        # updating its buffers but still uses them in evaluation: torch's behaviour too.
        pass_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            self._renorm_limits() if use_batch_stats else None,
        )

    def _renorm_limits(self) -> tuple[float, float] | None:
        """``(r_max, d_max)`` for Batch Renormalization (``BatchRenorm*d``); None: plain BN."""
        return None


class BatchNorm1d(_BatchNormBase):
    """Batch norm per feature: input (N, C), or (N, C, L) with statistics over N and L.

    Drop-in for ``torch.nn.BatchNorm1d``: same arguments, buffers, state_dict and results.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNormBase):
    """Batch norm per channel of images (N, C, H, W): statistics over N, H and W.

    Drop-in for ``torch.nn.BatchNorm2d``: same arguments, buffers, state_dict and results.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm(_BatchNormBase):
    """Our BN for any of (N, C), (N, C, L) and (N, C, H, W): per feature or per channel, by the
    input's rank (``norm=custom_bn``; the same state_dict as BatchNorm1d/2d)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input (got {input.dim()}D input)")
