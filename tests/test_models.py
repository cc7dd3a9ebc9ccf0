import pytest
import torch
from torch import nn

from models import get_model, list_models, register_model
from models.resnet import Bottleneck


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def test_registry_lists_every_model():
    assert list_models() == ["resnet50", "resnet50_seed", "vgg16"]


@pytest.mark.parametrize(
    "name, options",
    [("resnet50", {}), ("resnet50", {"stem": "cifar"}), ("resnet50_seed", {}), ("resnet50_seed", {"stem": "cifar"}), ("vgg16", {})],
)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name, options, num_classes):
    model = get_model(name, num_classes, **options).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_any_input_size_works(name):
    model = get_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 10)


def test_resnet50_matches_the_paper():
    assert count_parameters(get_model("resnet50", 10)) == 23_528_522
    model = get_model("resnet50", 1000).eval()
    assert count_parameters(model) == 25_557_032
    assert count_convs(model) == 53
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert [len(stage) for stage in model.stages] == [3, 4, 6, 3]
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(model.maxpool, nn.MaxPool2d)


def test_resnet50_stride_sits_on_the_3x3_of_each_stage_first_block():
    model = get_model("resnet50")
    for index, stage in enumerate(model.stages):
        first = stage[0]
        expected = (1, 1) if index == 0 else (2, 2)
        assert first.conv2.stride == expected and first.conv1.stride == (1, 1)
        assert isinstance(first.shortcut, nn.Sequential)  # projection where the shape changes
        assert all(isinstance(block.shortcut, nn.Identity) for block in stage[1:])


def test_cifar_stem_keeps_resolution():
    model = get_model("resnet50", stem="cifar").eval()
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert count_parameters(model) == 23_528_522 - 3 * 64 * (49 - 9)
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]


def test_seed_network_has_three_stages_downsampling_last():
    model = get_model("resnet50_seed").eval()
    assert [len(stage) for stage in model.stages] == [3, 4, 6]
    assert model.fc.in_features == 1024
    for stage in model.stages[1:]:
        assert stage[-1].conv2.stride == (2, 2)
        assert all(block.conv2.stride == (1, 1) for block in stage[:-1])
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14)]


def test_zero_init_residual_zeroes_each_last_batchnorm():
    model = get_model("resnet50", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(block.bn3.weight) == 0 for block in blocks)
    plain = get_model("resnet50")
    assert all(torch.all(m.bn3.weight == 1) for m in plain.modules() if isinstance(m, Bottleneck))


def test_vgg16_is_configuration_d():
    model = get_model("vgg16")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    conv_bn = sum(count_parameters(m) for m in model.features if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
    assert conv_bn == 14_723_136
    assert model.classifier.out_features == 10


@pytest.mark.parametrize("name", ["resnet50", "resnet50_seed", "vgg16"])
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = get_model(name).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet18'.*resnet50, resnet50_seed, vgg16"):
        get_model("resnet18")


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="does not take option.*depth"):
        get_model("vgg16", depth=19)
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        get_model("resnet50", stem="tiny")
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet50", num_classes=0)


def test_duplicate_name_raises():
    def vgg16(num_classes=10):
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="already registered"):
        register_model(vgg16)
    assert get_model("vgg16").__class__.__name__ == "VGG"


def test_input_resize_upsamples_to_the_given_size_and_keeps_the_layout():
    from models import InputResize

    images = torch.randn(2, 3, 32, 32)
    resized = InputResize(48)(images)
    assert resized.shape == (2, 3, 48, 48)
    torch.testing.assert_close(resized.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.05, rtol=0)
    constant = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(InputResize(64)(constant), torch.full((1, 3, 64, 64), 0.7))
    assert InputResize(32)(images) is images and InputResize(None)(images) is images
    channels_last = images.contiguous(memory_format=torch.channels_last)
    out = InputResize(48)(channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    with pytest.raises(ValueError, match="input size must be positive"):
        InputResize(0)
