"""Encoding images with a model that has a vision tower (a stage-4 workdir).

`run_folder.load_image_model(workdir)` reads the model; `ImageEncoder` decodes, resizes and
normalises images (see `data.images`) and runs them in fixed-size, sharded batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jasper_jax import sharding
from jasper_jax.data.images import load_pixels, open_rgb
from jasper_jax.encode import DTYPES, resolve_head
from jasper_jax.errors import UserError
from jasper_jax.models.multimodal import MultimodalConfig, MultimodalEmbedder, abstract_params

ImageSource = str | Path | bytes


class ImageEncoder:
    """Images -> L2-normalised float32 vectors in the text student's space.

    Args:
      config, params: the multimodal model (params: a numpy or jax tree).
      dtype: compute dtype, "float32" or "bfloat16".
      mesh: device mesh; defaults to data parallelism over all devices.
      batch_size: rows per step, rounded up to a multiple of the mesh's batch axes.
    """

    def __init__(
        self,
        config: MultimodalConfig,
        params: Any,
        *,
        dtype: str = "float32",
        mesh: jax.sharding.Mesh | None = None,
        batch_size: int = 64,
    ):
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        self.config = config
        self.mesh = mesh or sharding.make_mesh((-1, 1, 1))
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // shards) * shards
        self.module = MultimodalEmbedder(config, dtype=DTYPES[dtype])
        self.params = jax.device_put(
            params, sharding.param_shardings(abstract_params(config), self.mesh)
        )
        self._in_sharding = sharding.batch_sharding(self.mesh, 4)
        self._fns: dict[tuple[str, ...], Any] = {}

    def _fn(self, heads: tuple[str, ...]):
        if heads not in self._fns:

            def run(params, pixels):
                return self.module.apply(
                    {"params": params}, pixels, heads=heads, method=MultimodalEmbedder.embed_images
                )

            self._fns[heads] = jax.jit(run, out_shardings=sharding.replicated(self.mesh))
        return self._fns[heads]

    def check(self, images: Sequence[ImageSource]) -> None:
        """Decodes every image once, so a bad file stops the run before any compute."""
        for image in images:
            open_rgb(image, min_side=self.config.vision.patch_size)

    def encode_heads(
        self, images: Sequence[ImageSource], *, heads: Sequence[str], progress: bool = False
    ) -> dict[str, np.ndarray]:
        """images (paths or encoded bytes) -> {head: [len(images), dim] float32 unit vectors}."""
        heads = tuple(resolve_head(self.config.text, h) for h in heads)
        size, patch = self.config.vision.image_size, self.config.vision.patch_size
        out: dict[str, np.ndarray] = {}
        bar = tqdm(total=len(images), unit="image", disable=not progress, desc="encode")
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = np.zeros((self.batch_size, size, size, 3), np.float32)
            for i, image in enumerate(chunk):
                pixels[i] = load_pixels(image, size, min_side=patch)
            batch = jax.make_array_from_callback(
                pixels.shape, self._in_sharding, lambda index, x=pixels: x[index]
            )
            for name, vecs in self._fn(heads)(self.params, batch).items():
                vecs = np.asarray(vecs)[: len(chunk)]
                rows = out.setdefault(name, np.zeros((len(images), vecs.shape[-1]), np.float32))
                rows[start : start + len(chunk)] = vecs
            bar.update(len(chunk))
        bar.close()
        return out

    def encode(self, images: Sequence[ImageSource], *, head: str | None = None) -> np.ndarray:
        """images -> [len(images), dim] float32 unit vectors of `head` (default: the model's)."""
        head = resolve_head(self.config.text, head)
        return self.encode_heads(images, heads=(head,))[head]
