"""LightningModules of this project, and loading of their checkpoints."""

from lit_modules.checkpointing import CheckpointError, load_classifier
from lit_modules.classifier import LitClassifier

__all__ = ["CheckpointError", "LitClassifier", "load_classifier"]
