"""Shared fixtures: generated (untrained) checkpoints, exports and packages.

Everything is made on the fly from arcdeploy.synthetic and arcdeploy.demo.synth, so the suite needs no
downloads. Session-scoped, because exporting and building cost seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arcdeploy.demo.synth import generated_state_dict
from arcdeploy.synthetic import aligned_faces


@pytest.fixture(scope="session")
def r18_state_dict() -> dict[str, torch.Tensor]:
    return generated_state_dict("r18", seed=0)


@pytest.fixture(scope="session")
def r18_ckpt(tmp_path_factory, r18_state_dict):
    path = tmp_path_factory.mktemp("ckpt") / "r18_backbone.pth"
    torch.save(r18_state_dict, path)
    return path


@pytest.fixture(scope="session")
def mbf_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "mbf_backbone.pth"
    torch.save(generated_state_dict("mbf", seed=0), path)
    return path


@pytest.fixture(scope="session")
def r18_export(tmp_path_factory, r18_ckpt):
    from arcdeploy.exporter import export

    return export(r18_ckpt, tmp_path_factory.mktemp("export") / "r18")


@pytest.fixture(scope="session")
def mbf_export(tmp_path_factory, mbf_ckpt):
    from arcdeploy.exporter import export

    return export(mbf_ckpt, tmp_path_factory.mktemp("export") / "mbf")


@pytest.fixture(scope="session")
def r18_ort_fp32_pkg(tmp_path_factory, r18_export):
    """A small real package (ONNX Runtime fp32) for tests of later stages."""
    from arcdeploy import build

    return build(
        r18_export.out_dir, tmp_path_factory.mktemp("pkg") / "r18_ort_fp32", engine="onnxruntime", precision="fp32"
    )


@pytest.fixture(scope="session")
def faces16() -> np.ndarray:
    """16 aligned synthetic faces, uint8 RGB [16, 112, 112, 3]."""
    return aligned_faces(16, seed=3)
