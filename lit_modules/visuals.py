"""Figures and text for TensorBoard: confusion matrix, misclassified images, model summary."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from datamodules.transforms import denormalize  # noqa: E402


def confusion_matrix_figure(matrix: Tensor, class_names: list[str], title: str = "confusion matrix"):
    """Counts with true classes as rows, each cell shaded by its share of the row."""
    counts = matrix.cpu().long()
    shares = counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.55 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for row in range(counts.shape[0]):
        for col in range(counts.shape[1]):
            axes.text(col, row, str(int(counts[row, col])), ha="center", va="center", fontsize=7,
                      color="white" if shares[row, col] > 0.5 else "black")
    figure.tight_layout()
    return figure


def misclassified_figure(samples: list[tuple[Tensor, int, int]], class_names: list[str], columns: int = 8):
    """A grid of (normalised image, true label, predicted label) with 'true -> predicted' titles.

    One canvas in one axes: 32 subplots would take about 1.5 s to draw here, at every test.
    """
    rows = (len(samples) + columns - 1) // columns
    images = denormalize(torch.stack([image for image, _, _ in samples])).clamp(0, 1)
    side, gap, title = images.shape[-1], 4, 9  # pixels: an image, the gap between two, the title band above one
    cell_width, cell_height = side + gap, side + title
    canvas = np.ones((rows * cell_height, columns * cell_width, 3), dtype=np.float32)  # white
    width = 1.6 * columns
    figure = plt.figure(figsize=(width, width * canvas.shape[0] / canvas.shape[1]))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.axis("off")
    for index, (image, (_, true, predicted)) in enumerate(zip(images, samples)):
        row, column = divmod(index, columns)
        top, left = row * cell_height + title, column * cell_width + gap // 2
        canvas[top:top + side, left:left + side] = image.permute(1, 2, 0).numpy()
        axes.text(left + side / 2, top - 1, f"{class_names[true]}\n-> {class_names[predicted]}",
                  ha="center", va="bottom", fontsize=7)
    axes.imshow(canvas, interpolation="nearest")
    return figure


def model_summary_markdown(module: nn.Module, max_depth: int = 2) -> str:
    """Lightning's layer summary with parameter counts, as a Markdown code block."""
    from pytorch_lightning.utilities.model_summary import ModelSummary

    summary = str(ModelSummary(module, max_depth=max_depth))
    return "\n".join("    " + line for line in summary.splitlines())
