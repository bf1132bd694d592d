"""``arcdeploy demo``: the whole pipeline on generated data, with no downloads.

Everything it uses is made here, deterministically: an UNTRAINED r18
checkpoint (random weights, BatchNorm statistics fitted to synthetic faces),
an IJB-C-format mini set of cartoon faces (JPEG loose crops, 5 landmarks, the
three meta files and the three 1:N list files), a .bin verification set and calibration crops. The faces come
in look-alike families and with hard variations (pose, light, occluders, blur), so
the sets are not trivially separable: the ROC is a real curve, and fp32, bf16 and
int8 can differ on it. Its speed and fidelity figures are real for an r18 on this
machine; its TAR / accuracy figures measure how an untrained network separates
cartoons, not how well any model recognises people.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..files import write_json_atomic

UNTRAINED_NOTE = (
    "The checkpoint is GENERATED and UNTRAINED (random weights) and the faces are synthetic "
    "cartoons (look-alike families, hard variations): speed and fidelity figures are real for this "
    "architecture on this machine; TAR and accuracy figures show the protocols at work and how the "
    "precisions move the curve, not recognition accuracy. For real numbers run: "
    "arcdeploy run backbone.pth --calib CALIB_DIR --ijb IJB_release/IJBC --target IJBC "
    "--bins lfw.bin cfp_fp.bin agedb_30.bin -o out/"
)


@dataclass
class DemoConfig:
    arch: str = "r18"
    identities: int = 36
    templates_per_id: int = 2
    images_per_template: int = 3
    # look-alike families and hard variations (pose, light, occluders, blur): the sets are not
    # trivially separable, so the ROC is a curve and the precisions can differ on it
    family_size: int = 3
    likeness: float = 0.6
    hard: bool = True
    bin_pairs: int = 120
    bin_likeness: float = 0.0  # the .bin pairs: hard variations only (look-alikes too put it near chance)
    calib_images: int = 64
    precisions: tuple[str, ...] = ("auto",)  # this CPU's candidates (fp32, bf16 where native, int8), then the choice
    batches: tuple[int, ...] = (1, 16)
    iterations: int = 20
    engine: str = "openvino"


QUICK = DemoConfig(
    identities=8,
    templates_per_id=2,
    images_per_template=2,
    bin_pairs=40,
    calib_images=32,
    precisions=("fp32", "int8"),
    batches=(1, 4),
    iterations=5,
)


def prepare_data(data: Path, cfg: DemoConfig, log=print) -> dict[str, Path]:
    """Generate (once) the checkpoint, calibration crops, IJB-C mini set and .bin set under ``data``."""
    import cv2

    from ..synthetic import aligned_faces
    from .datasets import write_bin_set, write_ijb_set
    from .synth import write_generated_checkpoint

    data.mkdir(parents=True, exist_ok=True)
    stamp = data / "generated.json"
    wanted = {
        "arch": cfg.arch,
        "identities": cfg.identities,
        "templates_per_id": cfg.templates_per_id,
        "images_per_template": cfg.images_per_template,
        "bin_pairs": cfg.bin_pairs,
        "calib_images": cfg.calib_images,
        "family_size": cfg.family_size,
        "likeness": cfg.likeness,
        "hard": cfg.hard,
        "bin_likeness": cfg.bin_likeness,
        "format": 3,  # 3: the IJB set has 1:N list files
    }
    paths = {
        "ckpt": data / f"{cfg.arch}_untrained_generated.pth",
        "calib": data / "calib",
        "ijb": data / "IJB_release" / "IJBC",
        "bin": data / "synthetic_faces.bin",
    }
    if stamp.exists() and _read_json(stamp) == wanted and all(p.exists() for p in paths.values()):
        log(f"[reuse] generated data in {data}")
        return paths
    log(f"[run] generating an untrained {cfg.arch} checkpoint and synthetic data in {data} ...")
    write_generated_checkpoint(paths["ckpt"], cfg.arch, seed=0)
    paths["calib"].mkdir(parents=True, exist_ok=True)
    # calibration faces: other identities than the evaluation sets (a separate seed)
    for i, face in enumerate(aligned_faces(cfg.calib_images, seed=17)):
        cv2.imwrite(str(paths["calib"] / f"calib_{i:04d}.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    write_ijb_set(
        paths["ijb"],
        target="IJBC",
        identities=cfg.identities,
        templates_per_id=cfg.templates_per_id,
        images_per_template=cfg.images_per_template,
        seed=0,
        hard=cfg.hard,
        family_size=cfg.family_size,
        likeness=cfg.likeness,
    )
    write_bin_set(paths["bin"], pairs=cfg.bin_pairs, seed=1, hard=cfg.hard, likeness=cfg.bin_likeness)
    write_json_atomic(stamp, wanted)
    return paths


def _read_json(path: Path):
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def demo(out: str | Path = "arcdeploy-demo", cfg: DemoConfig | None = None, log=None, force: bool = False):
    """Run the demo into ``out``; returns the :class:`arcdeploy.run.RunResult`."""
    from ..quantize import QuantRecipe
    from ..run import claim_output, run_pipeline

    cfg = cfg or DemoConfig()
    log = log or logging.getLogger(__name__).info
    out = Path(out)
    claim_output(out, force)
    paths = prepare_data(out / "data", cfg, log)
    return run_pipeline(
        paths["ckpt"],
        out,
        engine=cfg.engine,
        precisions=cfg.precisions,
        calib=paths["calib"],
        ijb_root=paths["ijb"],
        target="IJBC",
        bins=[paths["bin"]],
        batches=cfg.batches,
        iterations=cfg.iterations,
        # without the fallback minute the default ranges would cost here; the manifest records it
        recipe=QuantRecipe.for_untrained_network(calibration_count=cfg.calib_images),
        log=log,
        title="arcdeploy demo (untrained model, synthetic data)",
        notes=[UNTRAINED_NOTE],
    )
