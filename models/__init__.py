"""Hand-built CIFAR-10 classifiers as plain ``nn.Module``s (no Lightning here)."""

from models import resnet, vgg  # noqa: F401  (importing registers the builders)
from models.input_resize import InputResize
from models.registry import get_model, list_models, register_model

__all__ = ["InputResize", "get_model", "list_models", "register_model"]
