"""LightningModules of this project."""

from lit_modules.classifier import LitClassifier

__all__ = ["LitClassifier"]
