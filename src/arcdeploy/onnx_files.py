"""ONNX files with their external data: how arcdeploy reads, writes and copies them.

A model file keeps its weights inside (one protobuf, at most 2 GB) or in external data files
beside it (``location`` entries relative to the model's folder; every model over 2 GB must).
``onnx.load`` reads external data into memory and forgets where it came from, so a model is
written back with :func:`save_onnx` (inline when it fits comfortably, else one data file
``NAME.data`` beside it) and copied with :func:`copy_onnx` (its data files too), never with a
plain file copy that would leave the weights behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import ArcdeployError

# above this a model is written with its weights in an external data file (protobuf's hard
# limit is 2 GB; the rest of the message, names and graph, needs room too)
INLINE_LIMIT = 1_800_000_000


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The external data files ``path``'s initializers name (relative to its folder), in order."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    names: list[str] = []
    for t in model.graph.initializer:
        if uses_external_data(t):
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location and location not in names:
                names.append(location)
    return names


def save_onnx(model, path: str | os.PathLike, inline_limit: int | None = None) -> list[str]:
    """Write ``model`` (loaded with its data) to ``path``: inline when it fits under
    ``inline_limit`` (default :data:`INLINE_LIMIT`), else with every weight in ``NAME.data``
    beside it. Returns the data files written (relative names)."""
    import onnx

    path = Path(path)
    limit = INLINE_LIMIT if inline_limit is None else inline_limit
    if model.ByteSize() <= limit:
        from onnx.external_data_helper import convert_model_from_external_data

        convert_model_from_external_data(model)  # weights inline, whatever the flags still say
        onnx.save(model, str(path))
        return []
    data = f"{path.name}.data"
    if (path.parent / data).exists():
        (path.parent / data).unlink()  # onnx appends to an existing data file
    # onnx moves the weights out of the message it saves: save a copy, the caller keeps its model whole
    copy = type(model)()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    return [data]


def data_entries(key: str, names: list[str]) -> dict[str, str]:
    """A manifest's ``files`` entries for a model's data files: ``KEY_data``, ``KEY_data1``, ..."""
    return {f"{key}_data{i or ''}": name for i, name in enumerate(names)}


def copy_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy a model file and its external data files (kept under the same relative names beside
    ``dst``). Returns the data files copied."""
    src, dst = Path(src), Path(dst)
    data = external_data_files(src)
    shutil.copyfile(src, dst)
    for name in data:
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ArcdeployError(f"{src}: its external data file {name!r} lies outside its folder; refused")
        (dst.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src.parent / rel, dst.parent / rel)
        except FileNotFoundError:
            raise ArcdeployError(f"{src}: its external data file {name} is missing") from None
    return data
