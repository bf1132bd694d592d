"""Generated stand-ins for real data, used by the demo and the tests.

Nothing here is trained or real: a deterministic *untrained* checkpoint whose
BatchNorm statistics are fitted to synthetic faces (so activations have sane
ranges, as in a trained net). The faces themselves come from :mod:`arcdeploy.synthetic`.
"""

from __future__ import annotations

from ..synthetic import aligned_faces


def generated_state_dict(arch: str = "r18", seed: int = 0, fit_images: int = 64) -> dict:
    """A deterministic, UNTRAINED state dict in the official layout.

    Weights are random (fixed seed); affine BN parameters and PReLU slopes are
    perturbed, and BatchNorm running statistics are fitted on synthetic faces
    so that every layer sees activations of a realistic scale, as in a trained
    net. It is meant for demos and tests, never for recognition.
    """
    import torch  # here, so that drawing faces does not pay for importing torch

    from ..backbones import build_model

    torch.manual_seed(seed)
    model = build_model(arch)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
                mod.momentum = None  # cumulative average over the fitting batches
                mod.reset_running_stats()
            elif isinstance(mod, torch.nn.PReLU):
                mod.weight.copy_(0.25 + 0.05 * torch.randn(mod.weight.shape, generator=gen))
        faces = aligned_faces(fit_images, seed=seed + 1)
        x = torch.from_numpy(faces).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)
        model.train()
        for chunk in x.split(16):
            model(chunk)
        model.eval()
        for mod in model.modules():
            if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                mod.momentum = 0.1
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_generated_checkpoint(path, arch: str = "r18", seed: int = 0) -> None:
    """Save :func:`generated_state_dict` as a plain ``backbone.pth``."""
    from pathlib import Path

    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(generated_state_dict(arch, seed), path)
