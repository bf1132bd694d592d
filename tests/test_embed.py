"""Faces in, embeddings out: the embed pipeline, its CLI, failures and resuming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest

import arcdeploy
from arcdeploy.cli import main
from arcdeploy.errors import ArcdeployError
from arcdeploy.faces import align_face, read_landmarks
from arcdeploy.faces.chunks import failures_path_for, parts_dir_for
from arcdeploy.faces.pipeline import embed_files, embed_images
from arcdeploy.synthetic import draw_face

N_LOOSE = 12


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def pkg(r18_ort_fp32_pkg):
    return arcdeploy.load(r18_ort_fp32_pkg)


@pytest.fixture(scope="module")
def loose_set(tmp_path_factory):
    """N_LOOSE loose-crop JPEGs in a folder tree, an IJB-style landmark file, and the decoded arrays."""
    root = tmp_path_factory.mktemp("loose") / "imgs"
    rows, names, arrays, lmks = [], [], [], []
    for i in range(N_LOOSE):
        img, lm = draw_face(i % 7, i, size=200)
        name = f"{i % 3}/{i:03d}.jpg"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append(f"{name} " + " ".join(f"{v:.4f}" for v in lm.ravel()) + " 0.99")
        names.append(name)
        arrays.append(cv2.imread(str(path))[..., ::-1].copy())
        lmks.append(lm)
    (root.parent / "lmk.txt").write_text("\n".join(rows) + "\n")
    return root, root.parent / "lmk.txt", names, arrays, lmks


def test_aligned_arrays_equal_engine_output_in_order(pkg, faces16):
    raw = pkg.infer(faces16)
    order = np.random.default_rng(0).permutation(16)
    got = pkg.embed(faces16[order], batch=5)
    assert got.shape == (16, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, _unit(raw[order]), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(pkg.embed(list(faces16[:3]), raw=True), raw[:3], rtol=1e-4, atol=1e-4)


def test_flip_gives_image_and_mirror(pkg, faces16):
    got = pkg.embed(faces16[:6], flip=True, raw=True, batch=4)
    assert got.shape == (6, 2, 512)
    np.testing.assert_allclose(got[:, 0], pkg.infer(faces16[:6]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[:, 1], pkg.infer(faces16[:6, :, ::-1]), rtol=1e-4, atol=1e-4)
    assert np.abs(got[:, 0] - got[:, 1]).max() > 1e-3  # the mirror is really a different input
    norm = pkg.embed(faces16[:2], flip=True)
    np.testing.assert_allclose(np.linalg.norm(norm, axis=-1), 1, atol=1e-5)


def test_paths_with_landmarks_equal_aligning_by_hand(pkg, loose_set):
    root, lmk_file, names, arrays, lmks = loose_set
    paths = [root / n for n in names[:8]]
    table = read_landmarks(lmk_file)  # the file's 4 decimals, as the pipeline sees them
    file_lmks = [table[n] for n in names[:8]]
    want = _unit(pkg.infer(np.stack([align_face(a, lm) for a, lm in zip(arrays[:8], file_lmks)])))
    by_file = embed_images(pkg, paths, landmarks=lmk_file)  # looked up by name (file name: unique)
    by_list = embed_images(pkg, arrays[:8], landmarks=file_lmks)
    np.testing.assert_allclose(by_file, want, atol=2e-5)
    np.testing.assert_allclose(by_list, want, atol=2e-5)
    # a grayscale or RGBA array is accepted too
    gray = embed_images(pkg, [arrays[0][..., 1]], landmarks=[lmks[0]])
    assert np.isfinite(gray).all()


def test_api_raises_on_a_bad_image(pkg, tmp_path, faces16):
    (tmp_path / "x.jpg").write_text("nope")
    with pytest.raises(ArcdeployError, match="x.jpg: not an image"):
        embed_images(pkg, [faces16[0], tmp_path / "x.jpg"])
    got = embed_images(pkg, [faces16[0], tmp_path / "x.jpg"], on_error="nan")
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()
    with pytest.raises(ArcdeployError, match="landmark entries"):
        embed_images(pkg, [faces16[0]], landmarks=[])


@pytest.mark.slow
def test_cli_bad_inputs_named_and_kept_in_order(pkg, loose_set, tmp_path, capsys):
    root, lmk_file, names, arrays, lmks = loose_set
    good = cv2.imencode(".jpg", arrays[0][..., ::-1])[1].tobytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(good[:40] + bytes(range(256)) * 8)
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("hello, I am text\n")
    far = lmks[1] + 500
    cv2.imwrite(str(bad / "offimage.png"), arrays[1][..., ::-1])
    cv2.imwrite(str(bad / "nolmk.png"), arrays[2][..., ::-1])
    entries = [
        (root / names[0], lmks[0], None),
        (bad / "corrupt.jpg", lmks[0], "corrupt JPEG"),
        (root / names[3], lmks[3], None),
        (bad / "empty.jpg", lmks[0], "empty file"),
        (bad / "missing.jpg", lmks[0], "no such file"),
        (bad / "text.jpg", lmks[0], "not an image"),
        (bad / "offimage.png", far, "landmarks off the image"),
        (bad / "nolmk.png", None, "no landmarks"),
        (root / names[5], lmks[5], None),
    ]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p}\n" for p, _, _ in entries))
    lmk_rows = [f"{p.name} " + " ".join(f"{v:.4f}" for v in lm.ravel()) for p, lm, _ in entries if lm is not None]
    (tmp_path / "lmk.txt").write_text("\n".join(lmk_rows) + "\n")
    out = tmp_path / "out" / "feats.npy"
    code = main(
        [
            "embed",
            str(pkg.path),
            "--images",
            str(lst),
            "--landmarks",
            str(tmp_path / "lmk.txt"),
            "--batch",
            "4",
            "--quiet",
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 3
    feats = np.load(out)
    assert feats.shape == (len(entries), 512)
    tsv = failures_path_for(out).read_text().splitlines()
    assert tsv[0] == "index\tpath\treason" and len(tsv) == 1 + sum(r is not None for _, _, r in entries)
    bad_rows = {int(line.split("\t")[0]): line for line in tsv[1:]}
    for i, (path, lm, reason) in enumerate(entries):
        if reason is None:
            lm = read_landmarks(tmp_path / "lmk.txt")[path.name]
            want = _unit(pkg.infer(align_face(arrays[int(path.stem)], lm)[None]))[0]
            np.testing.assert_allclose(feats[i], want, atol=2e-5)
        else:
            assert np.isnan(feats[i]).all()
            assert reason in bad_rows[i] and str(path) in bad_rows[i]
            assert any(str(path) in line and reason in line for line in err.splitlines()), (path, err)
    assert not parts_dir_for(out).exists()


@pytest.mark.slow
def test_cli_folder_with_landmarks_and_flip(pkg, loose_set, tmp_path, capsys):
    root, lmk_file, names, arrays, lmks = loose_set
    out = tmp_path / "f.npy"
    code = main(
        [
            "embed",
            str(pkg.path),
            "--images",
            str(root),
            "--landmarks",
            str(lmk_file),
            "--flip",
            "--raw",
            "--batch",
            "8",
            "--workers",
            "3",
            "--quiet",
            "-o",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    feats = np.load(out)
    order = sorted(range(len(names)), key=lambda i: names[i])  # folder listing is sorted by relative path
    table = read_landmarks(lmk_file)
    crops = np.stack([align_face(arrays[i], table[names[i]]) for i in order])
    assert feats.shape == (len(names), 2, 512)
    np.testing.assert_allclose(feats[:, 0], pkg.infer(crops), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats[:, 1], pkg.infer(crops[:, :, ::-1]), rtol=1e-4, atol=1e-4)
    assert not failures_path_for(out).exists()


# The CLI in a child process whose chunk store kills the process (SIGKILL: no cleanup of any kind)
# right after its k-th chunk is saved; k = 0 runs the plain CLI.
KILLED_AFTER_CHUNKS = """
import os, signal, sys
from arcdeploy.cli import main
from arcdeploy.faces import chunks

k, saved, save = int(sys.argv[1]), [0], chunks.ChunkStore.save

def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    saved[0] += 1
    if saved[0] >= k:
        os.kill(os.getpid(), signal.SIGKILL)

if k:
    chunks.ChunkStore.save = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def _embed_cmd(pkg, root, lmk_file, out, *extra, kill_after=0):
    return [
        sys.executable,
        "-c",
        KILLED_AFTER_CHUNKS,
        str(kill_after),
        "embed",
        str(pkg.path),
        "--images",
        str(root),
        "--landmarks",
        str(lmk_file),
        "--batch",
        "2",
        "--chunk-size",
        "4",
        "--quiet",
        "-o",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(pkg, loose_set, tmp_path):
    root, lmk_file, *_ = loose_set
    full = tmp_path / "full.npy"
    ref = embed_files(
        pkg,
        sorted(root.rglob("*.jpg")),
        landmarks=lmk_file,
        batch=2,
        chunk_rows=4,
        root=root,
        output=full,
        progress=False,
    )
    assert ref.ok and ref.features.shape == (N_LOOSE, 512)

    out = tmp_path / "resumed.npy"
    env = dict(os.environ)
    killed = subprocess.run(_embed_cmd(pkg, root, lmk_file, out, kill_after=2), env=env, capture_output=True, text=True)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr
    parts = parts_dir_for(out)
    saved = sorted(p.name for p in parts.glob("chunk_*.npy"))
    assert not out.exists() and saved == ["chunk_000000.npy", "chunk_000001.npy"]

    # another job's settings are refused, clearly, and the saved work is kept
    with pytest.raises(ArcdeployError, match=r"different job \(flip False -> True\)"):
        embed_files(
            pkg,
            sorted(root.rglob("*.jpg")),
            landmarks=lmk_file,
            batch=2,
            chunk_rows=4,
            root=root,
            output=out,
            flip=True,
            progress=False,
        )
    assert len(list(parts.glob("chunk_*.npy"))) == 2

    done = subprocess.run(_embed_cmd(pkg, root, lmk_file, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "8 resumed" in done.stdout
    assert out.read_bytes() == full.read_bytes()
    assert not parts.exists()


def test_restart_discards_other_parts(pkg, loose_set, tmp_path, capsys):
    root, lmk_file, *_ = loose_set
    out = tmp_path / "r.npy"
    parts = parts_dir_for(out)
    parts.mkdir()
    (parts / "state.json").write_text('{"format": "something else"}')
    np.save(parts / "chunk_000000.npy", np.zeros((4, 512), np.float32))  # saved work: not disposable
    args = ["embed", str(pkg.path), "--images", str(root), "--landmarks", str(lmk_file), "--quiet", "-o", str(out)]
    assert main(args) == 2
    assert "different job" in capsys.readouterr().err
    assert main([*args, "--restart"]) == 0
    assert np.load(out).shape == (N_LOOSE, 512) and not parts.exists()


def test_compare_cli(pkg, loose_set, capsys):
    root, lmk_file, names, arrays, lmks = loose_set
    a, b = root / names[0], root / names[7]  # identities 0 and 0 (i % 7)
    assert main(["compare", str(pkg.path), str(a), str(b), "--landmarks", str(lmk_file)]) == 0
    printed = float(capsys.readouterr().out.strip())
    table = read_landmarks(lmk_file)
    fa, fb = pkg.embed([arrays[0], arrays[7]], landmarks=[table[names[0]], table[names[7]]])
    assert printed == pytest.approx(arcdeploy.compare(fa, fb), abs=2e-6)
    assert main(["compare", str(pkg.path), str(a), str(root / "nope.jpg")]) == 2
    assert "nope.jpg: no such file" in capsys.readouterr().err
