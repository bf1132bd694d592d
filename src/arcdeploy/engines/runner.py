"""A model fed aligned crops: the one place that turns crops into a model's input (its
:class:`~arcdeploy.manifest.InputSpec`), pads batches for a model that runs at one fixed batch,
and feeds the inputs a graph lists beside its image.

A package's runtime (:class:`arcdeploy.package.Package`), its fp32 reference
(:class:`arcdeploy.fidelity.Reference`) and a foreign source under export
(:mod:`arcdeploy.sources.onnx_model`) all run through a :class:`CropRunner`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ArcdeployError

if TYPE_CHECKING:
    from ..manifest import InputSpec
    from .base import GraphSession


class CropRunner:
    """Aligned uint8 RGB crops [N, H, W, 3] -> the model's output [N, D].

    ``run`` takes one batch in the model's input format. A model that runs at one fixed
    ``batch`` only gets batches of exactly that size: the input is split, and the last batch
    is padded with copies of its last row, whose outputs are dropped. ``max_batch`` splits
    the input of a model that takes any batch (none: one call for everything).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        spec: InputSpec,
        batch: int | None = None,
        max_batch: int | None = None,
    ):
        self.run, self.spec, self.batch, self.max_batch = run, spec, batch, max_batch

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        return self.run_input(self.spec.to_model_input(faces))

    def run_input(self, x: np.ndarray) -> np.ndarray:
        """One or more batches already in the model's input format."""
        step = self.batch or self.max_batch
        if not step or (len(x) == self.batch if self.batch else len(x) <= step):
            return self.run(x)
        outs = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            pad = self.batch - len(chunk) if self.batch else 0
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(self.run(chunk)[: len(chunk) - pad])
        return np.concatenate(outs)


def graph_input_feed(
    session: GraphSession, input_name: str, strict: bool = True, where: str = "the graph"
) -> Callable[[np.ndarray], np.ndarray]:
    """A function running ``session`` on one image batch fed to ``input_name``; its first output.

    A foreign graph may list inputs no node reads; they get zeros of their fixed shape (1 where
    dynamic). When the graph has no input of that name, ``strict`` refuses it; otherwise the
    image goes to the first input (a reference that does not name its input)."""
    names = [i.name for i in session.inputs]
    if input_name not in names:
        if strict:
            raise ArcdeployError(f"{where}: the engine sees no input {input_name!r} (it has {', '.join(names)})")
        return session.run_one
    extra = {
        i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], dtype=_np_dtype(i.dtype))
        for i in session.inputs
        if i.name != input_name
    }
    if not extra:
        return session.run_one  # the image input is the only one
    return lambda x: session.run({input_name: x, **extra})[0]


def _np_dtype(name: str):
    try:
        return np.dtype(name)
    except TypeError:
        return np.float32
