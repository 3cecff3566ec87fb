"""normlab.nn.BatchNorm1d/2d against torch.nn.BatchNorm1d/2d, side by side.

Outputs, gradients of input/weight/bias, running buffers and the batch counter are compared
after several training steps and then in evaluation, over a grid of shapes, dtypes, momenta
and flags; plus gradcheck, state_dict compatibility, error messages and memory saved for
backward. The largest absolute difference met in the grid is printed by the last test
(``pytest -s tests/test_batchnorm.py``).
"""

from __future__ import annotations

import inspect
import re
import zlib
from collections.abc import Iterator
from itertools import product

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normlab.nn as ours

TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}

SHAPES = [
    (2, 3),  # smallest legal batch
    (16, 5),
    (4, 3, 7),  # (N, C, L) with L > 1
    (1, 4, 6),  # batch 1 is fine when L > 1
    (2, 3, 4, 5),
    (4, 3, 1, 1),  # H = W = 1
    (1, 2, 3, 3),
]


def classes(shape: tuple[int, ...]) -> tuple[type[nn.Module], type[nn.Module]]:
    if len(shape) == 4:
        return nn.BatchNorm2d, ours.BatchNorm2d
    return nn.BatchNorm1d, ours.BatchNorm1d


def assert_same(mine: torch.Tensor | None, theirs: torch.Tensor | None, what: str) -> None:
    """Equal up to the dtype's tolerance."""
    if theirs is None:
        assert mine is None, what
        return
    assert mine is not None, what
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, what
    if mine.is_floating_point():
        tol = TOLERANCE[mine.dtype]
        torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(mine, theirs), what


def make_pair(shape, dtype, generator, **kwargs) -> tuple[nn.Module, nn.Module]:
    """torch's layer with random gamma/beta, and ours loaded from its state_dict."""
    torch_cls, our_cls = classes(shape)
    theirs = torch_cls(shape[1], dtype=dtype, **kwargs)
    mine = our_cls(shape[1], dtype=dtype, **kwargs)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.copy_(torch.rand(shape[1], generator=generator, dtype=dtype) + 0.5)
        if theirs.bias is not None:
            theirs.bias.copy_(torch.randn(shape[1], generator=generator, dtype=dtype))
    mine.load_state_dict(theirs.state_dict())
    return theirs, mine


def random_input(shape, dtype, generator) -> torch.Tensor:
    """Per-channel offset and spread, so that mean and variance actually matter."""
    channel = [1, shape[1]] + [1] * (len(shape) - 2)
    offset = torch.randn(channel, generator=generator, dtype=dtype) * 2
    spread = torch.rand(channel, generator=generator, dtype=dtype) * 2.5 + 0.5
    return torch.randn(shape, generator=generator, dtype=dtype) * spread + offset


def step(theirs: nn.Module, mine: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, what: str):
    """One forward + backward of both layers on the same data; compare everything."""
    x_theirs = x.clone().requires_grad_()
    x_mine = x.clone().requires_grad_()
    y_theirs, y_mine = theirs(x_theirs), mine(x_mine)
    assert_same(y_mine, y_theirs, f"{what} output")
    params_theirs = [p for p in (theirs.weight, theirs.bias) if p is not None]
    params_mine = [p for p in (mine.weight, mine.bias) if p is not None]
    grads_theirs = torch.autograd.grad(y_theirs, [x_theirs, *params_theirs], grad_out)
    grads_mine = torch.autograd.grad(y_mine, [x_mine, *params_mine], grad_out)
    names = ["x", *(n for n in ("weight", "bias") if getattr(theirs, n) is not None)]
    for name, g_mine, g_theirs in zip(names, grads_mine, grads_theirs, strict=True):
        assert_same(g_mine, g_theirs, f"{what} grad {name}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_same(getattr(mine, name), getattr(theirs, name), f"{what} {name}")


def grid() -> Iterator:
    dtypes, momenta, flags = (torch.float32, torch.float64), (0.1, 0.5, None), (True, False)
    for shape, dtype, momentum, affine, track in product(SHAPES, dtypes, momenta, flags, flags):
        name = "x".join(map(str, shape))
        kind = f"{'affine' if affine else 'plain'}-{'track' if track else 'notrack'}"
        yield pytest.param(
            shape, dtype, momentum, affine, track, id=f"{name}-{str(dtype)[6:]}-m{momentum}-{kind}"
        )


@pytest.mark.parametrize(("shape", "dtype", "momentum", "affine", "track"), grid())
def test_matches_torch_train_then_eval(shape, dtype, momentum, affine, track):
    case = f"{shape}{dtype}{momentum}{affine}{track}"
    generator = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    theirs, mine = make_pair(
        shape, dtype, generator, momentum=momentum, affine=affine, track_running_stats=track
    )
    for mode, steps in (("train", 3), ("eval", 2), ("train", 1)):
        theirs.train(mode == "train")
        mine.train(mode == "train")
        for i in range(steps):
            x = random_input(shape, dtype, generator)
            grad_out = torch.randn(shape, generator=generator, dtype=dtype)
            step(theirs, mine, x, grad_out, f"{mode} step {i}")


@pytest.mark.skipif(not TORCH_HAS_BIAS_FLAG, reason="this torch has no bias= flag")
@pytest.mark.parametrize("shape", [(8, 3), (2, 3, 4, 4)])
def test_affine_without_bias_matches_torch(shape):
    generator = torch.Generator().manual_seed(1)
    theirs, mine = make_pair(shape, torch.float64, generator, bias=False)
    assert mine.bias is None and mine.weight is not None
    for mode in ("train", "train", "eval"):
        theirs.train(mode == "train")
        mine.train(mode == "train")
        x = random_input(shape, torch.float64, generator)
        step(theirs, mine, x, torch.randn(shape, generator=generator, dtype=torch.float64), mode)


@pytest.mark.parametrize("requires", [(True, False), (False, True)], ids=["x-only", "params-only"])
def test_partial_gradients(requires):
    """Only the inputs that require grad get one; values still equal torch's."""
    x_requires, params_require = requires
    generator = torch.Generator().manual_seed(2)
    theirs, mine = make_pair((6, 4, 5), torch.float64, generator)
    for module in (theirs, mine):
        module.requires_grad_(params_require)
    x = random_input((6, 4, 5), torch.float64, generator)
    grad_out = torch.randn(6, 4, 5, generator=generator, dtype=torch.float64)
    results = []
    for module in (theirs, mine):
        x_in = x.clone().requires_grad_(x_requires)
        wanted = [t for t in (x_in, module.weight, module.bias) if t.requires_grad]
        results.append(torch.autograd.grad(module(x_in), wanted, grad_out))
    for g_theirs, g_mine in zip(*results, strict=True):
        assert_same(g_mine, g_theirs, "partial grad")


def test_double_backward_is_refused_not_wrong():
    """Only first-order gradients are derived by hand; asking for more must fail loudly."""
    x = torch.randn(4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(ours.BatchNorm1d(3)(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_momentum_none_is_the_cumulative_average():
    """momentum=None: after k batches the running mean is the plain mean of the k batch means."""
    layer = ours.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    batches = [torch.randn(5, 3, dtype=torch.float64) + i for i in range(4)]
    for batch in batches:
        layer(batch)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected_mean)
    torch.testing.assert_close(layer.running_var, expected_var)
    assert layer.num_batches_tracked.item() == 4


def test_tracking_switched_off_after_construction_matches_torch():
    """Buffers exist but track_running_stats=False: no updates in training, used in eval."""
    generator = torch.Generator().manual_seed(3)
    theirs, mine = make_pair((8, 3, 2), torch.float64, generator)
    x = random_input((8, 3, 2), torch.float64, generator)
    for module in (theirs, mine):
        module(x)  # some non-trivial running stats
        module.track_running_stats = False
    for mode in ("train", "eval"):
        for module in (theirs, mine):
            module.train(mode == "train")
        x = random_input((8, 3, 2), torch.float64, generator)
        step(theirs, mine, x, torch.randn(8, 3, 2, generator=generator, dtype=torch.float64), mode)


def test_empty_batch_matches_torch():
    theirs, mine = make_pair((0, 3), torch.float32, torch.Generator().manual_seed(4))
    x = torch.zeros(0, 3)
    step(theirs, mine, x, torch.zeros(0, 3), "empty batch")


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(ours.BatchNorm1d, (5, 3)), (ours.BatchNorm1d, (3, 3, 4)), (ours.BatchNorm2d, (3, 3, 2, 2))],
)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(cls, shape, affine, training):
    layer = cls(3, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        layer(torch.randn(shape, dtype=torch.float64) + 1)  # non-trivial running stats
        if affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    layer.train(training)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    assert torch.autograd.gradcheck(lambda x, *_: layer(x), (x, *params))


def test_state_dict_loads_both_ways():
    generator = torch.Generator().manual_seed(5)
    for shape in ((4, 3), (2, 3, 2, 2)):
        for kwargs in ({}, {"affine": False}, {"track_running_stats": False}):
            torch_cls, our_cls = classes(shape)
            theirs, mine = torch_cls(3, **kwargs), our_cls(3, **kwargs)
            assert list(mine.state_dict()) == list(theirs.state_dict())
            theirs(random_input(shape, torch.float32, generator))  # non-default buffers
            mine.load_state_dict(theirs.state_dict())
            back = torch_cls(3, **kwargs)
            back.load_state_dict(mine.state_dict())
            for key, value in theirs.state_dict().items():
                assert torch.equal(mine.state_dict()[key], value), key
                assert torch.equal(back.state_dict()[key], value), key


def test_old_checkpoint_without_num_batches_tracked_loads_like_torch():
    """Version-1 state_dicts predate num_batches_tracked: torch keeps the current counter."""
    for module in (nn.BatchNorm1d(3), ours.BatchNorm1d(3)):
        module(torch.randn(4, 3))
        state = module.state_dict()
        del state["num_batches_tracked"]
        state._metadata[""]["version"] = 1
        module.load_state_dict(state)  # strict: no missing key reported
        assert module.num_batches_tracked.item() == 1


def test_constructor_and_buffers_mirror_torch():
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}):
        theirs = nn.BatchNorm2d(4, eps=1e-3, dtype=torch.float64, **kwargs)
        mine = ours.BatchNorm2d(4, eps=1e-3, dtype=torch.float64, **kwargs)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(mine, name) == getattr(theirs, name)
        expected = dict(theirs.named_buffers())
        assert {k: (v.dtype, v.shape) for k, v in mine.named_buffers()} == {
            k: (v.dtype, v.shape) for k, v in expected.items()
        }
        assert [(k, p.dtype) for k, p in mine.named_parameters()] == [
            (k, p.dtype) for k, p in theirs.named_parameters()
        ]
        mine_repr = mine.extra_repr()
        if not TORCH_HAS_BIAS_FLAG:  # older torch prints no bias= field
            mine_repr = re.sub(r"bias=\w+, ", "", mine_repr)
        assert mine_repr == theirs.extra_repr()


def test_reset_running_stats_and_parameters():
    layer = ours.BatchNorm1d(3)
    with torch.no_grad():
        layer.weight.fill_(2)
        layer.bias.fill_(1)
    layer(torch.randn(8, 3) * 3 + 1)
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.weight, torch.full((3,), 2.0))  # parameters kept
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(3))


def raised(module: nn.Module, x: torch.Tensor) -> tuple[type, str] | None:
    try:
        module(x)
    except Exception as error:  # whatever is raised, compared below
        return type(error), str(error)
    return None


@pytest.mark.parametrize(
    ("shape", "kwargs", "training"),
    [
        ((1, 3), {}, True),  # one value per channel
        ((1, 3, 1), {}, True),
        ((1, 3, 1, 1), {}, True),
        ((1, 3), {"track_running_stats": False}, False),  # eval, but batch statistics needed
        ((1, 3), {}, False),  # eval with running stats: allowed
        ((2, 3, 4, 4, 1), {}, True),  # wrong rank
        ((3,), {}, True),
        ((2, 3, 4), {}, True),  # 3-D into BatchNorm2d / fine for BatchNorm1d
        ((4, 3), {"eps": 0.0}, True),
        ((4, 3), {"eps": -1.0}, False),
    ],
)
def test_errors_match_torch(shape, kwargs, training):
    x = torch.randn(shape)
    pairs = [(nn.BatchNorm1d(3, **kwargs), ours.BatchNorm1d(3, **kwargs))]
    pairs.append((nn.BatchNorm2d(3, **kwargs), ours.BatchNorm2d(3, **kwargs)))
    for theirs, mine in pairs:
        theirs.train(training)
        mine.train(training)
        assert raised(mine, x) == raised(theirs, x)


def saved_tensor_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, list[int]]:
    """Bytes autograd keeps for backward (each storage once) and the sizes of what was saved."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(seen.values()), sorted(seen.values())


@pytest.mark.parametrize("shape", [(32, 64), (4, 8, 16), (8, 16, 6, 6)])
@pytest.mark.parametrize("affine", [True, False])
def test_saves_no_more_for_backward_than_torch(shape, affine):
    torch_cls, our_cls = classes(shape)
    x = torch.randn(shape, requires_grad=True)
    mine_bytes, mine_sizes = saved_tensor_bytes(our_cls(shape[1], affine=affine), x)
    theirs_bytes, _ = saved_tensor_bytes(torch_cls(shape[1], affine=affine), x)
    assert mine_bytes <= theirs_bytes
    activation = x.numel() * x.element_size()
    assert mine_sizes.count(activation) == 1  # exactly one activation-sized tensor
    assert all(size <= shape[1] * x.element_size() for size in mine_sizes[:-1])


class RecordOps(TorchDispatchMode):
    """Names of the aten operators that actually run (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_uses_no_native_batch_norm_kernel():
    """Forward, backward and eval run on elementary ops only."""
    layer = ours.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    with RecordOps() as recorder:
        layer(x).sum().backward()
        layer.eval()
        layer(x).sum().backward()
    with RecordOps() as reference:
        nn.BatchNorm2d(3)(x).sum().backward()
    assert [op for op in reference.ops if "batch_norm" in op]  # the recorder sees them
    assert recorder.ops and not [op for op in recorder.ops if "norm" in op]
