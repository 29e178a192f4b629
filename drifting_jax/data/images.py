"""Image helpers of the data side: the generator's pixel range, padding, sample grids as PNG."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from drifting_jax import paths


def uint8_to_model(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (the generator's pixel range)."""
  return images.astype(np.float32) / 127.5 - 1.0


def model_to_uint8(samples: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8, clipping what the generator overshoots."""
  return np.clip(np.round((np.asarray(samples, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, rows: int) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*H, cols*W, C] mosaic (row-major, 1-pixel gaps)."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  canvas = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    canvas[r * (h + 1): r * (h + 1) + h, k * (w + 1): k * (w + 1) + w] = images[i]
  return canvas


def save_png(path: str | os.PathLike, image: np.ndarray, scale: int = 2) -> None:
  img = image[..., 0] if image.shape[-1] == 1 else image
  pil = Image.fromarray(img)
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  buffer = io.BytesIO()
  pil.save(buffer, format="PNG")
  paths.write_atomically(path, buffer.getvalue())  # a local file or a bucket URL


def pad_images(images: np.ndarray, pad_to: int, black: float = -1.0) -> np.ndarray:
  """Centers [N, H, W, C] images on a black pad_to x pad_to canvas (0: unchanged).

  Black is -1 in model range (the default) and 0 for uint8 images.
  """
  if not pad_to:
    return images
  h = images.shape[1]
  if pad_to < h:
    raise ValueError(f"data.pad_to={pad_to} is smaller than the images ({h})")
  lo = (pad_to - h) // 2
  return np.pad(images, ((0, 0), (lo, pad_to - h - lo), (lo, pad_to - h - lo), (0, 0)), constant_values=black)
