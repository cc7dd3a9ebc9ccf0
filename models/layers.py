"""Building blocks shared by the networks."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _output_size(in_size: int, kernel: int, stride: int, padding: int) -> int:
    return (in_size + 2 * padding - kernel) // stride + 1


def _taps_joining(in_size: int, kernel: int, stride: int, padding: int) -> list[list[int]] | None:
    """For one spatial axis, ``taps[o][i]``: the kernel tap that joins output position ``o`` to input position ``i``.

    ``None`` unless every output position's window covers the whole input axis, so
    that every (output, input) pair is joined by exactly one tap.
    """
    out_size = _output_size(in_size, kernel, stride, padding)
    taps = [[i - o * stride + padding for i in range(in_size)] for o in range(out_size)]
    if out_size < 1 or any(not 0 <= tap < kernel for row in taps for tap in row):
        return None
    return taps


@lru_cache(maxsize=64)
def _dense_tap_index(
    height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[int, int, tuple[int, ...]] | None:
    """Output height and width, and the flattened-kernel tap of each (output pixel, input pixel) pair, or ``None``."""
    rows = _taps_joining(height, kernel[0], stride[0], padding[0])
    cols = _taps_joining(width, kernel[1], stride[1], padding[1])
    if rows is None or cols is None:
        return None
    index = tuple(
        row_tap * kernel[1] + col_tap
        for out_row in rows
        for out_col in cols
        for row_tap in out_row
        for col_tap in out_col
    )
    return len(rows), len(cols), index


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that, on a CPU, computes 1x1 convolutions and convolutions over tiny maps as matrix products.

    Two cases where a convolution is a plain matrix product, and oneDNN's
    convolution (its backward pass above all) is slower than the product on a CPU:

    * A 1x1 convolution with no padding on a channels-last batch: each output
      pixel is the weight matrix times one input pixel's channels (every
      ``stride``-th pixel). The batch's pixels are rows of a ``(pixels, channels)``
      matrix without a copy, so the layer is ``F.linear`` over them, and its
      output is channels-last again. ResNet-50's bottlenecks hold 36 such
      convolutions (switch: ``pointwise_as_matrix``).
    * Every output pixel's window covers the whole input map (a 3x3 convolution
      with padding 1 on a 1x1 or 2x2 map, or a strided one from 2x2 to 1x1):
      output pixel ``o`` takes input pixel ``i`` through exactly one kernel tap,
      and the taps that fall on the zero padding add nothing. The ImageNet-stem
      ResNet-50's last stage and VGG-16's last block see such maps on 32x32 to
      48x48 images. The layer gathers the taps into an ``(output pixels x output
      channels, input pixels x input channels)`` matrix and multiplies by it
      (switch: ``dense_tiny_maps``). On a CPU at 32-bit, oneDNN's backward pass of a 3x3
      convolution on a 1x1 map took about 200 ms for a batch of 128, a third of
      ResNet-50's whole training step at 32x32.

    A third case keeps the convolution for the values and for the input's gradient
    and only changes how the weight's gradient is computed:

    * Output maps of at most 5x5 pixels (``SMALL_MAP_PIXELS``) computed in bf16
      (under bf16 autocast or with bf16 weights): the weight's gradient
      is one matrix product, the output gradient's ``(pixels, out channels)``
      matrix transposed times the ``(pixels, taps x in channels)`` matrix of the
      input windows that produced those pixels. oneDNN's bf16 weight-gradient
      kernel took 3x the forward convolution's time on VGG-16's 5x5 maps at 40x40
      (47 ms against 15 ms for 512 channels, batch 128), the product 16 ms. On 3x3
      to 5x5 maps, batches of 64 to 512 and 256 or 512 channels the product took
      1.6x to 4.7x less time than that kernel; on 6x6 maps 0.6x to 1.3x, on 10x10
      and larger as much as 11x more, and at 32-bit 1.4x to 1.9x more on 3x3 to 5x5
      maps, so those keep the kernel (switch: ``weight_grad_as_matrix``). Values and
      the input's gradient are oneDNN's, so only the weight's gradient changes, by
      rounding.

    All three give the convolution's values up to rounding. ``bench/throughput.py``
    times each against ``nn.Conv2d``, at 32-bit and under bf16 autocast (RESULTS.md,
    "Convolutions on tiny maps", "1x1 convolutions as matrix products", "The
    matrix paths with bf16" and "Weight gradients on small maps"). Other maps,
    channels-first batches for the 1x1 case, and other devices (not measured) take
    ``nn.Conv2d``'s path. The
    weight keeps its shape, so parameters, checkpoints and initialisation are those
    of ``nn.Conv2d``. ``set_matrix_paths(model, ...)`` switches any of the paths off.
    """

    pointwise_as_matrix = True
    dense_tiny_maps = True
    weight_grad_as_matrix = True

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or self.groups != 1:
            return super().forward(x)
        if (
            self.pointwise_as_matrix
            and self.kernel_size == (1, 1)
            and self.padding == (0, 0)
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            batch, _, height, width = x.shape
            # One 2-D product. A strided selection is no longer one matrix in memory: reshape
            # copies it into one, where F.linear over the 4-D view would, without autograd,
            # multiply by a copy of the weight per image row (bmm: ResNet-50 validated 15x slower in bf16).
            pixels = x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)
            out = F.linear(pixels, _kernel_matrix(self.weight), self.bias)
            return out.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        # undilated, zero-padded by numbers: the windows the two paths below compute from
        plain_windows = self.dilation == (1, 1) and self.padding_mode == "zeros" and not isinstance(self.padding, str)
        dense = None
        if self.dense_tiny_maps and plain_windows:
            dense = _dense_tap_index(x.shape[-2], x.shape[-1], self.kernel_size, self.stride, self.padding)
        if dense is None:
            if self.weight_grad_as_matrix and plain_windows and torch.is_grad_enabled() and self._small_output_map(x):
                autocast_dtype = _autocast_dtype()
                if (autocast_dtype or x.dtype) == torch.bfloat16:
                    return _conv_with_matrix_weight_grad(x, self.weight, self.bias, self.stride, self.padding, autocast_dtype)
            return super().forward(x)
        out_height, out_width, index = dense
        in_channels, height, width = x.shape[1:]
        out_pixels, in_pixels = out_height * out_width, height * width
        # the kernel as one (out_ch, in_ch) block per tap, then one block per (output pixel, input pixel) pair
        tap_blocks = self.weight.permute(2, 3, 0, 1).reshape(-1, self.out_channels, in_channels)
        blocks = tap_blocks.index_select(0, torch.tensor(index, device=x.device))
        blocks = blocks.view(out_pixels, in_pixels, self.out_channels, in_channels)
        matrix = blocks.transpose(1, 2).reshape(out_pixels * self.out_channels, in_pixels * in_channels)
        bias = None if self.bias is None else self.bias.repeat(out_pixels)
        # pixel-major, channel-minor order: a channels-last batch flattens without a copy
        out = F.linear(x.permute(0, 2, 3, 1).reshape(-1, in_pixels * in_channels), matrix, bias)
        return out.view(-1, out_height, out_width, self.out_channels).permute(0, 3, 1, 2)

    def _small_output_map(self, x: Tensor) -> bool:
        out_height, out_width = map(_output_size, x.shape[-2:], self.kernel_size, self.stride, self.padding)
        return 0 < out_height * out_width <= SMALL_MAP_PIXELS


def _kernel_matrix(kernel: Tensor) -> Tensor:
    """A 1x1 kernel ``(out, in, 1, 1)`` as its ``(out, in)`` matrix, through views whose backward hands the gradient
    back with the kernel's own strides.

    ``flatten`` alone returns a channels-last kernel's gradient with contiguous strides. Autograd
    accepts that (its layout contract ignores size-1 dimensions), but DDP's gradient buckets compare
    strides exactly and warn that "grad strides do not match bucket view strides". Flattening the
    channels-last kernel from its memory order, ``(out, 1, 1, in)``, gives the gradient the kernel's
    strides, still without a copy.
    """
    if kernel.stride(-1) == 1:  # contiguous (out, in, 1, 1)
        return kernel.flatten(1)
    return kernel.permute(0, 2, 3, 1).flatten(1)


SMALL_MAP_PIXELS = 25
"""Output maps of at most this many pixels take the matrix product for the weight's gradient."""


def _autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype where autocast is on, else ``None``."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    else:
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if enabled else None


class _ConvMatrixWeightGrad(torch.autograd.Function):
    """A convolution whose backward pass computes the weight's gradient as one matrix product."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        batch, out_channels, out_height, out_width = grad_out.shape
        if ctx.needs_input_grad[1]:
            kernel_height, kernel_width = weight.shape[-2:]
            padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding[1], padding[1], padding[0], padding[0]))
            row_span, col_span = stride[0] * (out_height - 1) + 1, stride[1] * (out_width - 1) + 1
            # the input pixel under each tap, for every output pixel
            tap_inputs = [
                padded[:, i : i + row_span : stride[0], j : j + col_span : stride[1]]
                for i in range(kernel_height)
                for j in range(kernel_width)
            ]
            # (pixels, taps x in channels): tap-major, channel-minor, as the weight laid out channels-last
            windows = torch.stack(tap_inputs, dim=3).reshape(batch * out_height * out_width, -1)
            pixel_grads = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels)
            grad_weight = (pixel_grads.t() @ windows).view(out_channels, kernel_height, kernel_width, -1)
            grad_weight = grad_weight.permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def _conv_with_matrix_weight_grad(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, autocast_dtype: torch.dtype | None
) -> Tensor:
    if autocast_dtype is None:
        return _ConvMatrixWeightGrad.apply(x, weight, bias, stride, padding)
    # autocast casts a convolution's inputs; the casts stay outside, so their backward returns float32 gradients
    cast = [None if tensor is None else tensor.to(autocast_dtype) for tensor in (x, weight, bias)]
    with torch.autocast("cpu", enabled=False):
        return _ConvMatrixWeightGrad.apply(*cast, stride, padding)


PATH_SWITCHES = ("pointwise_as_matrix", "dense_tiny_maps", "weight_grad_as_matrix")


def set_matrix_paths(model: nn.Module, **switches: bool) -> None:
    """Switch the matrix-product paths of every ``Conv2d`` in ``model``: ``pointwise_as_matrix``, ``dense_tiny_maps``,
    ``weight_grad_as_matrix``."""
    unknown = set(switches) - set(PATH_SWITCHES)
    if unknown:
        raise ValueError(f"unknown path switch {', '.join(sorted(unknown))}; choose from {', '.join(PATH_SWITCHES)}")
    for module in model.modules():
        if isinstance(module, Conv2d):
            for name, enabled in switches.items():
                setattr(module, name, enabled)
