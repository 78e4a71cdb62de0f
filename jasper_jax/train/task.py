"""What a stage trains on, behind one small interface (`Task`), so the loop is stage-agnostic.

A task gives the loop: the Flax module and its random init, the pretrained parameters to load
(HF weights; the previous stage's params are loaded by the loop), the input pipeline, the
forward `(params, batch, rng) -> (student vectors per head, targets)`, the batch keys to put on
devices, what `model.json` records, and a held-out evaluation. Stages 1-3 are a `TextTask`,
stage 4 a `VisionTask`; `TASKS` maps a stage to its task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax

from jasper_jax.models.loading import LoadedModel
from jasper_jax.settings import Settings
from jasper_jax.train.text_task import TextTask
from jasper_jax.train.vision_task import VisionTask


class Task(Protocol):
    model: nn.Module
    batch_keys: tuple[str, ...]

    def init(self, rng: jax.Array) -> Any: ...  # boxed params (with logical axes)
    def pretrained(self) -> tuple[dict, str]: ...  # ({"encoder": ...}, description)
    def pipeline(self, s: Settings) -> Any: ...  # iterator of per-process numpy batches
    def forward(self, s: Settings) -> Callable: ...  # (params, batch, rng) -> (vectors, targets)
    def describe(self, s: Settings) -> dict: ...  # model.json
    def identity(self) -> dict: ...  # what a resumed run must match
    def loaded_model(self, s: Settings, params: Any) -> LoadedModel: ...  # text side
    def evaluate(self, s: Settings, params: Any, mesh: Any) -> dict[str, dict[str, float]]: ...


TASKS: dict[int, Callable[[Settings], Task]] = {
    1: TextTask.from_settings,
    2: TextTask.from_settings,
    3: TextTask.from_settings,
    4: VisionTask.from_settings,
}


def make_task(s: Settings) -> Task:
    """The task of the settings' stage."""
    return TASKS[s.stage](s)
