"""Several frozen teachers of one architecture as ONE grouped network (one forward for all).

T teachers with the same module tree become a single network whose every layer runs the T
teachers side by side, teacher-major along the channel axis:

- ``Conv2d(cin, cout, groups=g)`` → ``Conv2d(T·cin, T·cout, groups=T·g)``, weights (and biases)
  concatenated teacher after teacher, so group block t only sees teacher t's channels;
- ``BatchNorm2d(c)`` → ``BatchNorm2d(T·c)`` (weight, bias, running statistics concatenated;
  eval mode);
- ``Linear(in, out)`` → :class:`GroupedLinear`: (N, T·in) → (N, T·out) by one batched matmul;
- modules without parameters or buffers (ReLU, pools, adaptive pooling, Dropout in eval,
  Identity, Flatten, containers, FedMD's ``KerasSameAvgPool2d`` …) are kept as they are, except
  that ReLU → MaxPool2d inside a Sequential is run as MaxPool2d → ReLU (exactly the same).
  Channelwise operations (residual adds, pooling) keep the teacher blocks apart by themselves.

Anything else with parameters or buffers raises :class:`NotStackable`. Because a ``forward``
may still mix channels in ways the module tree does not show (``torch.cat`` along channels, a
reshape that hard-codes C), the constructor then *verifies* numerically, on a random batch,
that the grouped network gives every teacher's own logits; if not, it raises ``NotStackable``
too. Callers catch it and fall back to running the teachers one after another.

Why: on a small CPU a grouped convolution over T teachers costs far less than T separate ones
(one oneDNN call, one large GEMM, one autograd graph), ~1.8x for five ``cnn_small`` teachers
forward + backward to the input. ``torch.func.vmap`` over stacked parameters was ~2x slower
than the plain loop, so it is not used.

:class:`StackedBNHooks` is the BatchNorm-statistics term of DeepInversion for the grouped
network: for every BN layer it gives a (T,) vector, entry t = teacher t's
‖mean − running_mean‖₂ + ‖var − running_var‖₂ over its own channel block, which equals
:class:`~fed_distill.synthesis.bn_hooks.BNFeatureHooks` on teacher t alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fed_distill.class_stats import (
    ClassFeatureHook,
    ClassTargets,
    class_bn_term,
    class_mean_var,
    class_membership,
)
from fed_distill.synthesis.bn_hooks import BNHooksBase, batch_mean_var


class NotStackable(Exception):
    """The teachers cannot be run as one grouped network; run them one after another."""


class _BNWithStats(torch.autograd.Function):
    """Frozen (eval) BatchNorm ``y = x·scale + shift`` that also returns the per-channel batch
    mean and biased variance of ``x``, with one hand-written backward:

        ∂L/∂x = ∂L/∂y·scale + (2/n)·∂L/∂var·x + (∂L/∂mean − 2·mean·∂L/∂var)/n

    (two fused passes over the tensor). Autograd through a BN layer plus a separate statistics
    hook (square, two reductions, their backward, the accumulation) took ~3x as many passes
    over the largest tensors of a synthesis step; the values and gradient are the same up to
    float rounding (tested).
    """

    @staticmethod
    def forward(ctx, x, scale, shift):  # type: ignore[override]
        n = x.numel() // x.shape[1]
        # Σx and Σx² reduced along the memory layout, as bn_hooks.batch_mean_var does
        # (square + sum is ~2x faster on CPU than a fused vector_norm over the same axes).
        if x.is_contiguous():  # NCHW: reduce the contiguous (H, W) axes first
            mean = x.sum(dim=(2, 3)).sum(dim=0) / n
            mean_sq = x.square().sum(dim=(2, 3)).sum(dim=0) / n
        else:  # channels_last: all three at once
            mean = x.sum(dim=(0, 2, 3)) / n
            mean_sq = x.square().sum(dim=(0, 2, 3)) / n
        var_raw = mean_sq - mean * mean
        var = var_raw.clamp_min(0.0)
        y = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
        ctx.save_for_backward(x, mean, var_raw, scale)
        ctx.n = n
        return y, mean, var

    @staticmethod
    def backward(ctx, g_y, g_mean, g_var):  # type: ignore[override]
        x, mean, var_raw, scale = ctx.saved_tensors
        n = ctx.n
        c = (1, -1, 1, 1)
        if g_var is None:
            g_var = torch.zeros_like(mean)
        if g_mean is None:
            g_mean = torch.zeros_like(mean)
        g_var = g_var * (var_raw > 0)  # the clamp's gradient
        a = (2.0 / n) * g_var
        b = g_mean / n - a * mean
        grad = torch.addcmul(b.view(c), x, a.view(c))
        if g_y is not None:
            grad.addcmul_(g_y, scale.view(c))
        return grad, None, None


class _BNWithClassStats(torch.autograd.Function):
    """:class:`_BNWithStats` per class: also returns, for every teacher block t and class k, the
    mean and biased variance of ``x`` over the images of class k (``member`` (T, N, K) one-hot:
    the class of image n in teacher t's batch) and their positions, as (T, K, c) tensors. Same
    two fused passes in the backward, with the per-class coefficients gathered per image:

        ∂L/∂x[n, t·c] = ∂L/∂y·scale + a[t, k(n)]·x + b[t, k(n)],
        a = (2/n_k)·∂L/∂var,  b = ∂L/∂mean/n_k − a·mean
    """

    @staticmethod
    def forward(ctx, x, scale, shift, member):  # type: ignore[override]
        n_img, channels = x.shape[:2]
        t = member.shape[0]
        hw = x.shape[2] * x.shape[3]
        s1 = x.sum(dim=(2, 3)).view(n_img, t, -1)  # (N, T, c)
        s2 = x.square().sum(dim=(2, 3)).view(n_img, t, -1)
        inv = 1.0 / (member.sum(dim=1) * hw).clamp_min(1.0)  # (T, K)
        mean = torch.einsum("tnk,ntc->tkc", member, s1) * inv[..., None]
        var_raw = torch.einsum("tnk,ntc->tkc", member, s2) * inv[..., None] - mean * mean
        y = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
        ctx.save_for_backward(x, member, mean, var_raw, inv, scale)
        return y, mean, var_raw.clamp_min(0.0)

    @staticmethod
    def backward(ctx, g_y, g_mean, g_var):  # type: ignore[override]
        x, member, mean, var_raw, inv, scale = ctx.saved_tensors
        if g_var is None:
            g_var = torch.zeros_like(mean)
        if g_mean is None:
            g_mean = torch.zeros_like(mean)
        a = 2.0 * g_var * (var_raw > 0) * inv[..., None]  # (T, K, c)
        b = g_mean * inv[..., None] - a * mean
        n_img = x.shape[0]
        a_img = torch.einsum("tnk,tkc->ntc", member, a).reshape(n_img, -1, 1, 1)
        b_img = torch.einsum("tnk,tkc->ntc", member, b).reshape(n_img, -1, 1, 1)
        grad = torch.addcmul(b_img, x, a_img)
        if g_y is not None:
            grad = grad.addcmul_(g_y, scale.view(1, -1, 1, 1))
        return grad, None, None, None


class StatBatchNorm2d(nn.BatchNorm2d):
    """An eval-mode ``BatchNorm2d`` of T teachers' channel blocks (T·c channels) that, while
    ``collect`` is on and a gradient is being recorded, also computes each teacher's
    DeepInversion BN term (``term``: (T,)) with :class:`_BNWithStats`. Otherwise it is a plain
    eval BatchNorm."""

    def __init__(self, num_features: int, num_groups: int, eps: float, affine: bool) -> None:
        super().__init__(num_features, eps=eps, affine=affine)
        self.num_groups = num_groups
        self.collect = False
        self.term: torch.Tensor | None = None
        # per-class mode: (T, K, c) target mean / var, and the batch's (T, N, K) membership
        # and (T, K) class weights (set by StackedBNHooks)
        self.class_target: tuple[torch.Tensor, torch.Tensor] | None = None
        self.classes: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.collect:
            return super().forward(x)
        assert self.running_mean is not None and self.running_var is not None
        if self.class_target is not None and self.classes is not None:
            return self._forward_classes(x)
        t = self.num_groups
        if x.dtype == torch.float32 and torch.is_grad_enabled():
            y, mean, var = _BNWithStats.apply(x, *self._scale_shift())
        else:
            y = super().forward(x)
            mean, var = batch_mean_var(x.float())
        self.term = torch.linalg.vector_norm(
            mean.view(t, -1) - self.running_mean.view(t, -1), dim=1
        ) + torch.linalg.vector_norm(var.view(t, -1) - self.running_var.view(t, -1), dim=1)
        return y

    def _scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.running_mean is not None and self.running_var is not None
        inv = torch.rsqrt(self.running_var + self.eps)
        scale = inv if self.weight is None else self.weight * inv
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    def _forward_classes(self, x: torch.Tensor) -> torch.Tensor:
        """The per-class term (T,): Σ_k w[t,k] (‖mean[t,k] − target‖ + ‖var[t,k] − target‖)."""
        assert self.class_target is not None and self.classes is not None
        member, weights = self.classes
        if x.dtype == torch.float32 and torch.is_grad_enabled():
            y, mean, var = _BNWithClassStats.apply(x, *self._scale_shift(), member)
        else:
            y = super().forward(x)
            xf = x.float()
            n_img, t = xf.shape[0], self.num_groups
            blocks = xf.view(n_img, t, -1, *xf.shape[2:]).transpose(0, 1)  # (T, N, c, H, W)
            pairs = [class_mean_var(blocks[i], member[i]) for i in range(t)]
            mean = torch.stack([p[0] for p in pairs])
            var = torch.stack([p[1] for p in pairs])
        self.term = class_bn_term(mean, var, *self.class_target, weights)
        return y


class GroupedLinear(nn.Module):
    """T independent ``Linear(in, out)`` layers on (…, T·in) input → (…, T·out), teacher-major."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.num_groups, self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)  # (T, out, in)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, i = self.num_groups, self.in_features
        xs = x.reshape(-1, t, i).transpose(0, 1)  # (T, M, in)
        out = torch.bmm(xs, self.weight.transpose(1, 2))  # (T, M, out)
        if self.bias is not None:
            out = out + self.bias[:, None, :]
        return out.transpose(0, 1).reshape(*x.shape[:-1], t * self.out_features)


def _own_state(m: nn.Module) -> bool:
    # Parameters/buffers held by this module itself (not by its children).
    return any(v is not None for v in m._parameters.values()) or any(
        v is not None for v in m._buffers.values()
    )


def _same(mods: list[nn.Module], *attrs: str) -> None:
    for a in attrs:
        vals = [getattr(m, a) for m in mods]
        if any(v != vals[0] for v in vals[1:]):
            raise NotStackable(f"{type(mods[0]).__name__}.{a} differs between teachers: {vals}")


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if tensors[0] is None:
        if any(t is not None for t in tensors):
            raise NotStackable("a layer has a bias/affine tensor in some teachers only")
        return None
    return torch.cat([t.detach() for t in tensors], dim=0)  # type: ignore[misc]


def _stack_conv(mods: list[nn.Conv2d]) -> nn.Conv2d:
    _same(mods, "in_channels", "out_channels", "kernel_size", "stride", "padding")
    _same(mods, "dilation", "groups", "padding_mode")
    m0, t = mods[0], len(mods)
    bias = _cat([m.bias for m in mods])
    out = nn.Conv2d(
        t * m0.in_channels,
        t * m0.out_channels,
        m0.kernel_size,
        stride=m0.stride,
        padding=m0.padding,
        dilation=m0.dilation,
        groups=t * m0.groups,
        bias=bias is not None,
        padding_mode=m0.padding_mode,
    )
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight.detach() for m in mods], dim=0))
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _stack_bn(mods: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    _same(mods, "num_features", "eps", "affine", "track_running_stats")
    m0, t = mods[0], len(mods)
    if not m0.track_running_stats or m0.running_mean is None:
        raise NotStackable("BatchNorm2d without running statistics")
    out = StatBatchNorm2d(t * m0.num_features, t, eps=m0.eps, affine=m0.affine)
    with torch.no_grad():
        out.running_mean.copy_(_cat([m.running_mean for m in mods]))  # type: ignore[arg-type]
        out.running_var.copy_(_cat([m.running_var for m in mods]))  # type: ignore[arg-type]
        out.num_batches_tracked.copy_(m0.num_batches_tracked)  # type: ignore[arg-type]
        if m0.affine:
            out.weight.copy_(_cat([m.weight for m in mods]))  # type: ignore[arg-type]
            out.bias.copy_(_cat([m.bias for m in mods]))  # type: ignore[arg-type]
    return out


def _stack_linear(mods: list[nn.Linear]) -> GroupedLinear:
    _same(mods, "in_features", "out_features")
    bias = None
    if mods[0].bias is not None:
        _cat([m.bias for m in mods])  # checks all-or-none
        bias = torch.stack([m.bias.detach() for m in mods])  # type: ignore[union-attr]
    return GroupedLinear(torch.stack([m.weight.detach() for m in mods]), bias)


def build_grouped(teachers: list[nn.Module]) -> nn.Module:
    """The grouped network of ``teachers`` (same module tree); raises :class:`NotStackable`.

    Not yet verified: :class:`StackedTeachers` checks the outputs before using it.
    """
    if not teachers:
        raise NotStackable("no teachers")
    if any(type(t) is not type(teachers[0]) for t in teachers):
        raise NotStackable("the teachers are of different classes")
    trees = [dict(t.named_modules()) for t in teachers]
    names = list(trees[0])
    if any(list(tr) != names for tr in trees[1:]):
        raise NotStackable("the teachers' module trees differ")
    grouped = copy.deepcopy(teachers[0])
    for name in names:
        mods = [tr[name] for tr in trees]
        kind = type(mods[0])
        if any(type(m) is not kind for m in mods):
            raise NotStackable(f"module {name!r} has different types across teachers")
        if kind is nn.Conv2d:
            new: nn.Module = _stack_conv(mods)  # type: ignore[arg-type]
        elif kind is nn.BatchNorm2d:
            new = _stack_bn(mods)  # type: ignore[arg-type]
        elif kind is nn.Linear:
            new = _stack_linear(mods)  # type: ignore[arg-type]
        elif _own_state(mods[0]):
            raise NotStackable(f"module {name!r} ({kind.__name__}) has parameters or buffers")
        else:
            continue  # parameter-free (or a container whose children are handled here)
        if name == "":
            grouped = new
        else:
            parent_name, _, attr = name.rpartition(".")
            parent = grouped.get_submodule(parent_name) if parent_name else grouped
            setattr(parent, attr, new)
    _pool_before_relu(grouped)
    return grouped


def _pool_before_relu(net: nn.Module) -> None:
    """In every ``nn.Sequential``, ReLU → MaxPool2d becomes MaxPool2d → ReLU: the same values
    and gradients (max and ReLU are both monotone, so they commute exactly), with the ReLU
    and its backward on a quarter of the elements (~10% of a cnn_small synthesis step)."""
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        mods = list(seq)
        i = 0
        while i < len(mods) - 1:
            a, b = mods[i], mods[i + 1]
            if type(a) is nn.ReLU and type(b) is nn.MaxPool2d and not b.return_indices:
                seq[i], seq[i + 1] = b, a
                i += 2
            else:
                i += 1


class StackedTeachers(nn.Module):
    """T frozen teachers of one architecture run as one grouped network (module docstring).

    ``input_shape`` = (C, H, W) of one image; the constructor verifies, on a random batch of
    that shape, that the grouped outputs equal every teacher's own outputs (``atol``), and
    raises :class:`NotStackable` otherwise. ``memory_format`` is applied to the grouped net.

    ``forward(x)``: ``x`` is either one batch (N, C, H, W) that every teacher sees, or one batch
    per teacher (T, N, C, H, W); the result is (T, N, K): teacher t's logits in row t.
    """

    def __init__(
        self,
        teachers: list[nn.Module],
        input_shape: tuple[int, int, int],
        memory_format: torch.memory_format = torch.preserve_format,
        atol: float = 1e-4,
        verify_batch: int = 4,
    ) -> None:
        super().__init__()
        self.num_teachers = len(teachers)
        self.input_shape = tuple(int(s) for s in input_shape)
        try:
            ref = teachers[0].parameters().__next__()
            device, dtype = ref.device, ref.dtype
        except StopIteration:
            device, dtype = torch.device("cpu"), torch.float32
        grouped = build_grouped(teachers)
        self.net = grouped.to(device, dtype, memory_format=memory_format)
        self.net.eval().requires_grad_(False)
        self._verify(teachers, device, dtype, atol, verify_batch)

    def _verify(
        self,
        teachers: list[nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        atol: float,
        n: int,
    ) -> None:
        # A fixed generator: verification never consumes the caller's random stream.
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn((self.num_teachers, n, *self.input_shape), generator=gen)
        x = x.to(device, dtype)
        modes = [t.training for t in teachers]
        try:
            for t in teachers:
                t.eval()
            with torch.inference_mode():
                want = torch.stack([t(x[i]) for i, t in enumerate(teachers)])
                got_each = self(x)
                got_shared = self(x[0])
                want_shared = torch.stack([t(x[0]) for t in teachers])
        except NotStackable:
            raise
        except Exception as exc:  # any forward that cannot take the grouped layout
            raise NotStackable(f"grouped forward failed: {type(exc).__name__}: {exc}") from exc
        finally:
            for t, m in zip(teachers, modes, strict=True):
                t.train(m)
        for got, ref in ((got_each, want), (got_shared, want_shared)):
            if got.shape != ref.shape or not torch.allclose(got, ref, atol=atol, rtol=1e-4):
                err = (got - ref).abs().max().item() if got.shape == ref.shape else "shape"
                raise NotStackable(
                    f"grouped outputs differ from the teachers' own (max error {err}): the "
                    "forward mixes channels across teachers"
                )

    def stack_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) shared or (T, N, C, H, W) per teacher → (N, T·C, H, W)."""
        t = self.num_teachers
        if x.dim() == 4:
            return x.repeat(1, t, 1, 1)
        if x.dim() == 5 and x.shape[0] == t:
            return x.transpose(0, 1).reshape(x.shape[1], t * x.shape[2], *x.shape[3:])
        raise ValueError(
            f"StackedTeachers expects (N, C, H, W) or ({t}, N, C, H, W) input, got {tuple(x.shape)}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.stack_input(x))  # (N, T·K)
        n = out.shape[0]
        return out.reshape(n, self.num_teachers, -1).transpose(0, 1)  # (T, N, K)


class StackedBNHooks(BNHooksBase):
    """BN-statistics terms of every teacher in a :class:`StackedTeachers`, one forward each.

    A context manager: inside it the grouped network's BN layers compute the terms, on exit
    (even on an exception) they go back to plain BatchNorm. After a forward, :meth:`loss` gives
    a (T,) tensor: entry t = Σ over BN layers of teacher t's ‖mean − running_mean‖₂ +
    ‖var − running_var‖₂ on its own channel block (first layer weighted by
    ``first_bn_multiplier``), the same as ``BNFeatureHooks(teacher_t).loss()``.
    Set ``enabled = False`` for forwards that need no term. With ``class_targets`` and
    :meth:`set_classes` (labels (N,) shared by every teacher or (T, N), one batch per teacher;
    class weights (K,) or (T, K)), the per-class term of
    :class:`~fed_distill.synthesis.bn_hooks.BNFeatureHooks` instead, with the same fused
    backward.
    """

    def __init__(
        self,
        stacked: StackedTeachers,
        class_targets: list[ClassTargets] | None = None,
    ) -> None:
        self.stacked = stacked
        self.layers: list[StatBatchNorm2d] = []
        self._enabled = True
        # per teacher: its class targets (see BNFeatureHooks.set_classes)
        self._class_targets = class_targets
        self.feature = None

    def __enter__(self) -> StackedBNHooks:
        self.layers = [m for m in self.stacked.net.modules() if isinstance(m, StatBatchNorm2d)]
        for m in self.layers:
            if m.collect:
                self.layers = []
                raise RuntimeError("StackedBNHooks are already active on this network")
        for j, m in enumerate(self.layers):
            m.term = None
            m.collect = self._enabled
            if self._class_targets is not None:
                per_teacher = [ct.bn[j] for ct in self._class_targets]
                m.class_target = (
                    torch.stack([p[0] for p in per_teacher]).to(m.running_mean),
                    torch.stack([p[1] for p in per_teacher]).to(m.running_mean),
                )
        cts = self._class_targets
        if cts is not None and all(ct.feat is not None for ct in cts):
            heads = [m for m in self.stacked.net.modules() if isinstance(m, GroupedLinear)]
            if heads:
                feats = torch.stack([ct.feat for ct in cts])  # type: ignore[misc]
                self.feature = ClassFeatureHook(heads[-1], feats)
        return self

    def _units(self) -> list[StatBatchNorm2d]:
        return self.layers

    def _term(self, unit: StatBatchNorm2d) -> torch.Tensor | None:  # type: ignore[override]
        return unit.term

    def _remove_units(self) -> None:
        for m in self.layers:
            m.collect = False
            m.term = None
            m.class_target = m.classes = None
        self.layers = []

    def _class_inputs(self, labels: torch.Tensor, weights: torch.Tensor) -> tuple[tuple, tuple]:
        t, k = self.stacked.num_teachers, weights.shape[-1]
        member = class_membership(labels, k).to(weights)
        member = member.expand(t, *member.shape[-2:]) if member.dim() == 2 else member
        weights = weights.expand(t, k) if weights.dim() == 1 else weights
        return (member, weights), (member, weights)

    def _feature_term(self) -> torch.Tensor:
        assert self._class_targets is not None and self.feature is not None
        assert self.feature.term is not None
        return self._class_targets[0].feature_scale * self.feature.term

    @property
    def active(self) -> bool:
        return any(m.collect for m in self.layers)

    def _is_enabled(self) -> bool:
        return self._enabled

    def _set_enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        for m in self.layers:
            m.collect = self._enabled


def use_grouped(grouped: bool | None, device: torch.device) -> bool:
    """``synthesis.grouped`` resolved: None = auto, grouped on CUDA or with more than one CPU
    thread (at one thread a grouped network only makes every tensor T times larger)."""
    if grouped is None:
        return device.type != "cpu" or torch.get_num_threads() > 1
    return bool(grouped)


def try_stack(
    teachers: list[nn.Module],
    input_shape: tuple[int, int, int],
    memory_format: torch.memory_format = torch.preserve_format,
) -> tuple[StackedTeachers | None, str]:
    """``(StackedTeachers, "")`` or ``(None, reason)`` when the teachers cannot be grouped."""
    try:
        return StackedTeachers(teachers, input_shape, memory_format=memory_format), ""
    except NotStackable as exc:
        return None, str(exc)
