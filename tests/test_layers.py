import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from models import get_model
from models.layers import Conv2d, set_matrix_paths


def paired_convs(in_channels, out_channels, bias, **conv_options):
    torch.manual_seed(0)
    reference = nn.Conv2d(in_channels, out_channels, bias=bias, **conv_options)
    layer = Conv2d(in_channels, out_channels, bias=bias, **conv_options)
    layer.load_state_dict(reference.state_dict())
    return reference, layer


def float64_reference(reference: nn.Conv2d, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``reference``'s output and the gradients of its squared sum (input, weight, bias), computed in float64.

    Not oneDNN's float32 convolution: its backward of a strided 1x1 convolution with
    six channels on a channels-last 4x4 map gave wrong weight gradients in some runs here.
    """
    reference = reference.double()
    images = images.detach().double().requires_grad_(True)
    output = reference(images)
    grads = torch.autograd.grad(output.pow(2).sum(), [images, *reference.parameters()])
    return output.float(), [grad.float() for grad in grads]


def assert_matrix_path_gives_the_convolution(monkeypatch, reference, layer, images) -> tuple[list, list]:
    """``layer`` computes ``images`` without F.conv2d, with ``reference``'s output and gradients; both sets of gradients."""
    expected, expected_grads = float64_reference(reference, images)
    conv_calls = count_conv2d_calls(monkeypatch)
    found = layer(images)
    found_grads = torch.autograd.grad(found.pow(2).sum(), [images, *layer.parameters()])

    assert conv_calls == []  # the matrix product, not the convolution, computed it
    assert found.shape == expected.shape
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    for found_grad, expected_grad in zip(found_grads, expected_grads, strict=True):
        torch.testing.assert_close(found_grad, expected_grad, rtol=1e-5, atol=1e-5)
    return found_grads, expected_grads


def count_conv2d_calls(monkeypatch) -> list:
    calls = []
    original = torch.nn.functional.conv2d

    def counting_conv2d(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", counting_conv2d)
    return calls


TINY_MAPS = [
    # (kernel, stride, padding, input height, input width)
    (3, 1, 1, 1, 1),  # ResNet-50's last stage on 32x32 images
    (3, 2, 1, 2, 2),  # its first block's strided 3x3, 2x2 -> 1x1
    (3, 1, 1, 2, 2),  # VGG-16's last block on 32x32, ResNet-50's last stage on 48x48
    (1, 1, 0, 1, 1),  # the 1x1 convolutions around a 1x1 map
    (3, 1, 1, 1, 2),  # not square
    (5, 1, 2, 3, 3),
]


@pytest.mark.parametrize("kernel, stride, padding, height, width", TINY_MAPS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiny_map_matrix_product_equals_the_convolution_with_its_gradients(
    monkeypatch, kernel, stride, padding, height, width, bias, channels_last
):
    reference, layer = paired_convs(6, 5, bias, kernel_size=kernel, stride=stride, padding=padding)
    layer.pointwise_as_matrix = False  # the tiny-map path alone
    images = torch.randn(4, 6, height, width)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    images.requires_grad_(True)

    found_grads, expected_grads = assert_matrix_path_gives_the_convolution(monkeypatch, reference, layer, images)
    # the taps that only ever meet the zero padding get no gradient, as in nn.Conv2d
    assert torch.equal(found_grads[1] == 0, expected_grads[1] == 0)


@pytest.mark.parametrize(
    "conv_options, height",
    [
        ({"kernel_size": 3, "padding": 1}, 4),  # a 4x4 map: corner outputs do not see the far pixels
        ({"kernel_size": 1, "stride": 2}, 2),  # a strided 1x1 skips input pixels
        ({"kernel_size": 3, "padding": 1, "groups": 2}, 1),
        ({"kernel_size": 3, "padding": 2, "dilation": 2}, 1),
        ({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, 2),
    ],
)
def test_other_maps_and_options_take_the_convolution(monkeypatch, conv_options, height):
    reference, layer = paired_convs(4, 6, True, **conv_options)
    layer.pointwise_as_matrix = False  # the tiny-map path alone
    images = torch.randn(2, 4, height, height)
    conv_calls = count_conv2d_calls(monkeypatch)
    found = layer(images)
    assert len(conv_calls) == 1
    torch.testing.assert_close(found, reference(images))


POINTWISE = [
    # (stride, input height, input width)
    (1, 4, 4),  # ResNet-50's bottleneck 1x1 convolutions
    (2, 4, 4),  # its strided shortcuts
    (2, 2, 2),  # 2x2 -> 1x1, the last stage's shortcut at 32x32
    (2, 5, 3),  # odd and not square: the last row and column are kept
    (1, 1, 1),
]


@pytest.mark.parametrize("stride, height, width", POINTWISE)
@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_matrix_product_equals_the_convolution_with_its_gradients(monkeypatch, stride, height, width, bias):
    reference, layer = paired_convs(6, 5, bias, kernel_size=1, stride=stride)
    layer.dense_tiny_maps = False  # the 1x1 path alone
    images = torch.randn(4, 6, height, width).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    assert_matrix_path_gives_the_convolution(monkeypatch, reference, layer, images)
    assert layer(images).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("autocast", [False, True])
def test_pointwise_weight_gradient_keeps_the_channels_last_kernels_strides(autocast):
    layer = Conv2d(6, 5, kernel_size=1).to(memory_format=torch.channels_last)
    images = torch.randn(4, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(images).float().square().sum().backward()
    assert layer.weight.stride() == (6, 1, 6, 6)  # channels-last
    assert layer.weight.grad.stride() == layer.weight.stride() and layer.weight.grad.dtype == torch.float32


class RecordedOps(TorchDispatchMode):
    """The names of the aten operators run inside it, e.g. ``mm``, ``bmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("autocast", [False, True])
def test_pointwise_path_without_autograd_is_one_two_dimensional_product(stride, autocast):
    """Validation and test run without autograd. There a strided 1x1 layer given a bf16 batch
    (a previous layer's output under autocast) once multiplied by a copy of the weight per
    image row (``bmm``), which made ResNet-50's validation 15x slower in bf16."""
    reference, layer = paired_convs(16, 8, True, kernel_size=1, stride=stride)
    images = torch.randn(4, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    if autocast:
        images = images.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast), RecordedOps() as ops:
        found = layer(images)
    products = [name for name in ops.names if name in ("mm", "addmm", "bmm", "baddbmm", "matmul", "convolution")]
    assert products == ["addmm"]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        expected = reference(images)  # nn.Conv2d: a bf16 batch under autocast, a bf16 convolution
    tolerance = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(found.float(), expected.float(), rtol=tolerance, atol=tolerance)
    assert found.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("conv_options", [{"stride": 1}, {"padding": 1}, {"groups": 2}])
def test_pointwise_path_takes_only_channels_last_batches_without_padding_or_groups(monkeypatch, conv_options):
    reference, layer = paired_convs(4, 6, True, kernel_size=1, **conv_options)
    images = torch.randn(2, 4, 3, 3)  # channels-first
    if conv_options != {"stride": 1}:
        images = images.contiguous(memory_format=torch.channels_last)
    conv_calls = count_conv2d_calls(monkeypatch)
    found = layer(images)
    assert len(conv_calls) == 1
    torch.testing.assert_close(found, reference(images))


@pytest.mark.parametrize(
    "switch, conv_options, height",
    [("dense_tiny_maps", {"kernel_size": 3, "padding": 1}, 1), ("pointwise_as_matrix", {"kernel_size": 1}, 3)],
)
def test_a_switched_off_path_takes_the_convolution(monkeypatch, switch, conv_options, height):
    _, layer = paired_convs(4, 6, False, **conv_options)
    setattr(layer, switch, False)
    conv_calls = count_conv2d_calls(monkeypatch)
    layer(torch.randn(2, 4, height, height).contiguous(memory_format=torch.channels_last))
    assert len(conv_calls) == 1


def test_set_matrix_paths_switches_every_layer_of_a_network():
    model = get_model("resnet50")
    set_matrix_paths(model, pointwise_as_matrix=False)
    convs = [module for module in model.modules() if isinstance(module, Conv2d)]
    assert len(convs) == 52 and not any(conv.pointwise_as_matrix for conv in convs)  # all but the stem
    assert all(conv.dense_tiny_maps for conv in convs)
    with pytest.raises(
        ValueError, match="unknown path switch dense; choose from pointwise_as_matrix, dense_tiny_maps, weight_grad_as_matrix"
    ):
        set_matrix_paths(model, dense=False)


def test_layer_keeps_the_convolution_weights_shape_and_state_dict_keys():
    reference, layer = paired_convs(8, 16, False, kernel_size=3, padding=1)
    assert isinstance(layer, nn.Conv2d)
    assert layer.weight.shape == (16, 8, 3, 3)
    assert list(layer.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("name, size", [("resnet50", 32), ("resnet50", 48), ("vgg16", 32)])
def test_networks_give_the_convolution_path_results(monkeypatch, name, size):
    # float64: in training mode a fresh network's BatchNorm on 1x1 maps amplifies float32
    # rounding in the gradients to several percent, whichever path computes them
    torch.manual_seed(0)
    model = get_model(name).train().to(torch.float64, memory_format=torch.channels_last)
    images = torch.randn(8, 3, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    conv_calls = count_conv2d_calls(monkeypatch)
    logits = model(images)
    grads = torch.autograd.grad(logits.logsumexp(1).sum(), list(model.parameters()))
    dense_conv_calls = len(conv_calls)
    set_matrix_paths(model, pointwise_as_matrix=False, dense_tiny_maps=False, weight_grad_as_matrix=False)
    reference_logits = model(images)
    assert dense_conv_calls < len(conv_calls) - dense_conv_calls  # tiny maps and 1x1s took the matrix products
    reference_grads = torch.autograd.grad(reference_logits.logsumexp(1).sum(), list(model.parameters()))

    torch.testing.assert_close(logits, reference_logits, rtol=1e-10, atol=1e-10)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-8, atol=1e-10)


SMALL_MAPS = [
    # (stride, input height, input width): output maps of at most 25 pixels
    (1, 5, 5),  # VGG-16's last block but one at 40x40
    (2, 6, 6),  # ResNet-50's strided 3x3 into its third stage at 48x48
    (1, 3, 3),  # that stage's other 3x3 convolutions
    (2, 10, 9),  # odd and not square, 5x5 out
]


def backward_ops(output: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[str]]:
    with RecordedOps() as ops:
        grads = torch.autograd.grad(output.pow(2).sum(), inputs)
    return list(grads), ops.names


@pytest.mark.parametrize("stride, height, width", SMALL_MAPS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_map_weight_gradient_in_bf16_is_one_matrix_product_equal_to_the_convolutions(
    monkeypatch, stride, height, width, bias, channels_last
):
    reference, layer = paired_convs(6, 5, bias, kernel_size=3, stride=stride, padding=1)
    layer.bfloat16()  # bf16 weights, as with --precision bf16-true
    images = torch.randn(4, 6, height, width).bfloat16()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    expected, expected_grads = float64_reference(reference, images)

    conv_calls = count_conv2d_calls(monkeypatch)
    found = layer(images.requires_grad_(True))
    found_grads, ops = backward_ops(found.float(), [images, *layer.parameters()])

    assert len(conv_calls) == 1  # the forward pass stays a convolution
    assert ops.count("convolution_backward") == 1 and ops.count("mm") == 1  # input's gradient; weight's
    torch.testing.assert_close(found.float(), expected, rtol=2e-2, atol=2e-2)
    for found_grad, expected_grad in zip(found_grads, expected_grads, strict=True):
        assert found_grad.dtype == torch.bfloat16
        torch.testing.assert_close(found_grad.float(), expected_grad, rtol=2e-2, atol=2e-2 * expected_grad.abs().max().item())


def test_small_map_weight_gradient_under_bf16_autocast_matches_the_convolutions():
    reference, layer = paired_convs(32, 16, True, kernel_size=3, padding=1)
    images = torch.randn(8, 32, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        expected = reference(images)
        found = layer(images)
    expected_grads, _ = backward_ops(expected.float(), list(reference.parameters()))
    found_grads, ops = backward_ops(found.float(), list(layer.parameters()))  # a first layer: no input gradient

    assert found.dtype == expected.dtype == torch.bfloat16
    assert "convolution_backward" not in ops and ops.count("mm") == 1
    for found_grad, expected_grad in zip(found_grads, expected_grads, strict=True):
        assert found_grad.dtype == torch.float32  # the float32 weights' gradients
        torch.testing.assert_close(found_grad, expected_grad, rtol=2e-2, atol=2e-2 * expected_grad.abs().max().item())


@pytest.mark.parametrize(
    "height, switched_on, grad_enabled, autocast",
    # a 6x6 map; the switch off; no autograd; 32-bit
    [(6, True, True, True), (5, False, True, True), (5, True, False, True), (5, True, True, False)],
)
def test_other_cases_keep_the_convolutions_weight_gradient(height, switched_on, grad_enabled, autocast):
    reference, layer = paired_convs(6, 5, False, kernel_size=3, padding=1)
    layer.weight_grad_as_matrix = switched_on
    images = torch.randn(4, 6, height, height)
    with torch.set_grad_enabled(grad_enabled), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        with RecordedOps() as ops:
            found = layer(images)
        expected = reference(images)
    if grad_enabled:
        _, backward = backward_ops(found.float(), [layer.weight])
        assert backward.count("convolution_backward") == 1 and "mm" not in backward
    assert "convolution" in ops.names and "mm" not in ops.names
    torch.testing.assert_close(found, expected)
