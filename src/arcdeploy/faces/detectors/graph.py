"""An SCRFD graph given a real batch axis (and, for a package, a fixed input size).

insightface's SCRFD files take one image ``[1, 3, H, W]`` and give per stride scores ``[K, 1]``,
boxes ``[K, 4]`` and keypoints ``[K, 10]``: each head's output ``[1, A*C, h, w]`` is transposed to
``[h, w, 1, A*C]`` and reshaped to ``[-1, C]``, which folds the batch into the anchors. Here the
transposes put the batch first (``[1, h, w, A*C]``: the same memory order for one image) and the
reshapes keep it (``[0, -1, C]``: dimension 0 copied from their input), so ``N`` canvases give
``[N, K, C]``; exports whose reshapes carry a traced batch of 1 (``[1, -1, C]``) are freed the
way recognition graphs are (:func:`arcdeploy.sources.onnx_graph.make_batch_dynamic`). Nothing else
in SCRFD depends on the batch (its FPN resizes take their sizes from the feature maps' shapes),
and :func:`batch_check` proves it by running both graphs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import ArcdeployError

# ops that may sit between the reshape and a graph output without touching the shape
_ELEMENTWISE = ("Sigmoid", "Identity", "Cast", "Relu")


def batched_scrfd(model, input_size: tuple[int, int] | None = None, source: str = "the detector") -> list[str]:
    """Rewrite an SCRFD ONNX model (in place) to take ``[batch, 3, H, W]`` and give ``[batch, K, C]``
    outputs; ``input_size`` (width, height) fixes H and W. Returns one line per rewrite; a graph
    whose outputs are not reached this way is refused, naming the output."""
    from onnx import numpy_helper

    from ...sources import onnx_graph as og

    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ArcdeployError(f"{source}: expected one image input, found {len(inputs)}")
    image = inputs[0]
    rewrites = [f"{r} (a traced batch of 1)" for r in og.make_batch_dynamic(model, image.name, 1, ("Reshape",))]
    consts = og.constant_values(graph)
    prods = og.producers(graph)
    for out in graph.output:
        node = prods.get(out.name)
        while node is not None and node.op_type in _ELEMENTWISE:
            node = prods.get(node.input[0])
        if node is None or node.op_type != "Reshape":
            raise ArcdeployError(
                f"{source}: output {out.name!r} does not come from a Reshape; cannot give it a batch axis"
            )
        dims = og.tensor_dims(out)
        channels = dims[-1] if dims and isinstance(dims[-1], int) else None
        before = prods.get(node.input[0])
        if before is not None and before.op_type == "Transpose":
            attr = next((a for a in before.attribute if a.name == "perm"), None)
            perm = list(attr.ints) if attr is not None else []
            if (
                attr is not None and perm and perm[0] != 0
            ):  # e.g. [1, C, h, w] -> [h, w, 1, C]: the batch must come first
                new_perm = [0] + [p for p in perm if p != 0]
                del attr.ints[:]
                attr.ints.extend(new_perm)
                rewrites.append(f"Transpose {before.name!r}: perm {perm} -> {new_perm} (the batch first)")
        if node.input[1] in consts:
            shape = np.asarray(consts[node.input[1]]).reshape(-1)
            if len(shape) == 2:  # [K or -1, C]: the batch folded into the anchors
                channels = int(shape[1])
                name = f"{node.input[1]}/with_batch"
                k = 1
                while name in consts:
                    name, k = f"{node.input[1]}/with_batch_{k}", k + 1
                graph.initializer.append(numpy_helper.from_array(np.array([0, -1, channels], np.int64), name))
                consts[name] = np.array([0, -1, channels])
                rewrites.append(
                    f"Reshape {node.name!r}: shape {shape.tolist()} -> [0, -1, {channels}] (keeps the batch)"
                )
                node.input[1] = name
            elif len(shape) != 3:
                raise ArcdeployError(
                    f"{source}: output {out.name!r} is reshaped to {shape.tolist()}; expected [K, C] or [N, K, C]"
                )
        _set_dims(out, ["batch", None, channels])
    # intermediate shapes recorded for the traced, unbatched graph (the heads' [K, C]) contradict the
    # batched one, and ONNX Runtime warns on every load: dropped, as recognition graphs given a
    # dynamic batch drop them (sources/onnx_model.py)
    del graph.value_info[:]
    _set_dims(image, ["batch", 3, *(list(input_size[::-1]) if input_size else og.tensor_dims(image)[2:])])
    og.prune_dead_nodes(graph)
    return rewrites


def _set_dims(value_info, dims: list) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int) and d > 0:
            dim.dim_value = d
        elif isinstance(d, str):
            dim.dim_param = d


def write_batched(
    src: str | os.PathLike, dst: str | os.PathLike, input_size: tuple[int, int] | None = None
) -> list[str]:
    """``src`` (an SCRFD ONNX file) rewritten by :func:`batched_scrfd` into ``dst``."""
    import onnx

    model = onnx.load(str(src))
    rewrites = batched_scrfd(model, input_size, str(src))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return rewrites


def batch_check(src: str | os.PathLike, batched: str | os.PathLike, canvases: np.ndarray) -> float:
    """The largest difference between the batched graph run on ``canvases`` (float32 [N, 3, H, W],
    the detector's input) all at once and the source graph run on each alone (ONNX Runtime)."""
    from ...engines import open_graph

    one, many = open_graph(Path(src), "onnxruntime"), open_graph(Path(batched), "onnxruntime")
    together = many.run({many.inputs[0].name: canvases})
    worst = 0.0
    for b in range(len(canvases)):
        alone = one.run({one.inputs[0].name: canvases[b : b + 1]})
        for a, t in zip(alone, together):
            worst = max(worst, float(np.abs(a.reshape(t[b].shape) - t[b]).max()))
    return worst
