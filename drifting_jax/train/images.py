"""Conversions between model samples and images, and sample grids as PNG."""

from __future__ import annotations

import os
import pathlib

import numpy as np


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
  from PIL import Image
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  img = image[..., 0] if image.shape[-1] == 1 else image
  pil = Image.fromarray(img)
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  tmp = path.with_suffix(".tmp.png")
  pil.save(tmp)
  os.replace(tmp, path)
