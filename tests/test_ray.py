"""Embedding on a Ray cluster: the local run's output, row for row, on a real two-node cluster.

The cluster runs on this machine, on loopback only: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray
gives every node 127.0.0.1 (``ray start`` would advertise the machine's interface address), and a
test checks that no process of the cluster listens or connects anywhere else. Each node has one
CPU and a small object store, so the cluster fits beside everything else on a small machine.

Features are compared bit for bit: both runs send the same inference batches (the same --batch,
blocks of whole batches) to the same engine with one thread, on the same machine, so the
arithmetic is the same. (Between machines with other CPUs the last bits may differ, as they would
for two local runs there.)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from arcdeploy.cli import main
from arcdeploy.synthetic import draw_face
from real_material import REAL, needs_real

pytestmark = pytest.mark.slow  # starts Ray clusters

SRC = Path(__file__).resolve().parents[1] / "src"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}
N_FACES = 40
REPEATS = 4  # the list names every image this many times: a job long enough to interrupt
# (the tests that need no interruption run the list once: each image of the long job costs them ~30 ms
# on the loopback cluster, on top of the ~4 s a Ray job takes to start)
BATCH = 4  # inference batch of every run here; blocks are then 4 images (the default for this job size)


# ------------------------------------------------------------------ material


@pytest.fixture(scope="module")
def mbf_pkg(tmp_path_factory, mbf_export):
    from arcdeploy import build

    return Path(
        str(
            build(
                mbf_export.out_dir,
                tmp_path_factory.mktemp("pkg") / "mbf_ort_fp32",
                engine="onnxruntime",
                precision="fp32",
            )
        )
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A list file of loose-crop JPEGs with a landmark file, and failures of each kind: not an
    image (under a name that is not UTF-8), a missing file, an image without landmarks."""
    root = tmp_path_factory.mktemp("rayjob") / "imgs"
    rows, names = [], []
    for i in range(N_FACES):
        img, lm = draw_face(i % 7, i, size=160)
        name = f"{i % 3}/{i:03d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if i != 7:  # no landmarks for this one
            rows.append(f"{name} " + " ".join(f"{v:.4f}" for v in lm.ravel()) + " 0.99")
        names.append(name)
    bad = os.fsdecode(b"caf\xe9.jpg")
    (root / bad).write_bytes(b"hello, not an image")
    pts = "50 60 110 60 80 90 60 120 100 120 0.9"
    rows += [f"{bad} {pts}", f"missing/none.jpg {pts}"]
    names[5:5] = [bad]
    names[20:20] = ["missing/none.jpg"]
    (root / "list.txt").write_bytes(os.fsencode("\n".join(names * REPEATS) + "\n"))
    (root / "once.txt").write_bytes(os.fsencode("\n".join(names) + "\n"))
    (root.parent / "lmk.txt").write_bytes(os.fsencode("\n".join(rows) + "\n"))
    return root / "list.txt", root.parent / "lmk.txt"


@pytest.fixture(scope="module")
def short_job(job):
    """The job's list with each image named once (every kind of failure still in it)."""
    images, lmk = job
    return images.with_name("once.txt"), lmk


def _args(pkg, job, out, *extra):
    images, lmk = job
    return [
        "embed",
        str(pkg),
        "--images",
        str(images),
        "--landmarks",
        str(lmk),
        "--flip",
        "--batch",
        str(BATCH),
        "--threads",
        "1",
        "-q",
        "-o",
        str(out),
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def local(mbf_pkg, job, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "feats.npy"
    assert main(_args(mbf_pkg, job, out)) == 3
    feats = np.load(out)
    assert feats.shape == (REPEATS * (N_FACES + 2), 2, 512)
    return out


@pytest.fixture(scope="module")
def short_local(mbf_pkg, short_job, local, tmp_path_factory):
    out = tmp_path_factory.mktemp("short_local") / "feats.npy"
    assert main(_args(mbf_pkg, short_job, out)) == 3
    feats = np.load(out)
    assert feats.shape == (N_FACES + 2, 2, 512)
    # the long job's first rows, made by the same inference batches up to the last one (which holds
    # the list's end here and the next repeat's first images there)
    whole = (N_FACES + 2) // BATCH * BATCH
    assert np.array_equal(feats[:whole], np.load(local)[:whole], equal_nan=True)
    return out


@pytest.fixture(scope="module")
def ray_env():
    """This process's and its children's environment for Ray on loopback, apart from any other Ray here."""
    if importlib.util.find_spec("ray") is None:  # (find_spec of ray.data would import ray: not yet)
        pytest.skip("Ray is not installed (pip install 'arcdeploy[ray]')")
    tmp = tempfile.mkdtemp(prefix="ardray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    mp = pytest.MonkeyPatch()
    # every node on 127.0.0.1; Ray reads this when it is imported, so before that (this process and
    # the command under test), and in Ray's constant too in case something here imported Ray earlier
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setenv("RAY_TMPDIR", tmp)  # Ray's files and address file here
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.setenv("PYTHONPATH", os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'arcdeploy[ray]')")
        from ray._private import ray_constants
        from ray._private.services import get_node_ip_address

        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        assert get_node_ip_address() == "127.0.0.1"  # before any process starts
        yield Path(tmp)
    finally:
        mp.undo()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_env):
    """A head and one more node, one CPU each, on 127.0.0.1; shut down whatever happens."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        assert c.address.startswith("127.0.0.1:")
        c.add_node(**node)
        yield c
    finally:
        if c is not None:
            c.shutdown()


# ------------------------------------------------------------------ helpers


def _start(args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "arcdeploy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or os.environ.copy(),
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _finish_on_loopback(proc: subprocess.Popen) -> tuple[int, str, str]:
    """:func:`_finish`, checking the sockets while the job runs: many, all on loopback."""
    seen, outside = 0, []
    while proc.poll() is None:
        count, found = _sockets()
        seen, outside = max(seen, count), outside + found
        time.sleep(0.25)
    result = _finish(proc)
    assert seen > 10 and not outside, outside
    return result


def _sockets() -> tuple[int, list[str]]:
    """The internet sockets of this process and all its descendants (the cluster, the command under
    test): how many, and those bound or connected to an address other than 127.0.0.1. One reading of
    the machine's socket tables per call (a reading per process took seconds from the job it watches)."""
    import psutil

    me = psutil.Process()
    ours = {me.pid, *(child.pid for child in me.children(recursive=True))}
    count, found = 0, []
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in ours:
            continue
        count += 1
        for addr in (c.laddr, c.raddr):
            if addr and addr.ip not in LOOPBACK:
                found.append(f"{_process_name(c.pid)} (pid {c.pid}): {c.laddr} -> {c.raddr} {c.status}")
    return count, found


def _process_name(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"


def _chunks(out: Path) -> int:
    return len(list(out.with_name(out.name + ".parts").glob("chunk_*.npy")))


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


def _same_output(got: Path, want: Path) -> None:
    a, b = np.load(got), np.load(want)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.array_equal(a, b, equal_nan=True)  # bit for bit (module doc)
    fa, fb = got.with_name("feats.failures.tsv"), want.with_name("feats.failures.tsv")
    assert fa.read_bytes() == fb.read_bytes()
    assert not got.with_name(got.name + ".parts").exists()


def _embedder_pids(besides: frozenset[int] = frozenset()) -> list[int]:
    """The embedding actors' processes under this one, other than ``besides`` (the actors of the
    test before may still be exiting: their driver has gone, Ray stops them a moment later, later on
    a busy machine)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid not in besides and ("BlockEmbedder" in p.name() or "BlockEmbedder" in " ".join(p.cmdline())):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


# ------------------------------------------------------------------ tests


@pytest.mark.slow
def test_driver_read_equals_local_on_loopback(cluster, mbf_pkg, short_job, short_local, tmp_path):
    """Given 127.0.0.1:PORT, the command contacts that address only (every socket of the run on loopback),
    even where Ray on its own would swap it for the machine's network address
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset); the embeddings equal the local run's."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = tmp_path / "feats.npy"
    proc = _start(_args(mbf_pkg, short_job, out, "--ray", cluster.address), env=env)
    rc, stdout, stderr = _finish_on_loopback(proc)
    assert rc == 3, stderr[-2000:]
    _same_output(out, short_local)
    n = N_FACES + 2
    assert f"embedded {n - 3} of {n} images" in stdout
    # the summary per node accounts for every image
    per_node = [int(line.split(": ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("  node ")]
    assert per_node and sum(per_node) == n
    assert "missing/none.jpg: no such file" in stderr


@pytest.mark.slow
def test_workers_read_equals_local(cluster, mbf_pkg, short_job, short_local, tmp_path):
    out = tmp_path / "feats.npy"
    rc, _, stderr = _finish(
        _start(_args(mbf_pkg, short_job, out, "--ray", cluster.address, "--ray-read", "workers", "--ray-actors", "2"))
    )
    assert rc == 3, stderr[-2000:]
    _same_output(out, short_local)


@pytest.mark.slow
def test_actor_killed_mid_job_is_retried(cluster, mbf_pkg, job, local, tmp_path):
    out = tmp_path / "feats.npy"
    earlier = frozenset(_embedder_pids())  # an actor of the test before, still exiting, is not this job's
    proc = _start(_args(mbf_pkg, job, out, "--ray", cluster.address))
    _wait_for(lambda: _chunks(out) >= 1 and _embedder_pids(earlier), proc)
    victim = _embedder_pids(earlier)[0]
    os.kill(victim, signal.SIGKILL)
    saved_at_kill = _chunks(out)
    rc, stdout, stderr = _finish(proc)
    total = -(-REPEATS * (N_FACES + 2) // BATCH)
    assert saved_at_kill < total  # it died mid-job
    assert rc == 3, stderr[-2000:]
    _same_output(out, local)


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(cluster, mbf_pkg, job, local, tmp_path):
    out = tmp_path / "feats.npy"
    args = _args(mbf_pkg, job, out, "--ray", cluster.address)
    proc = _start(args)
    _wait_for(lambda: _chunks(out) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    saved = _chunks(out)
    assert not out.exists() and saved >= 2
    rc, stdout, stderr = _finish(_start(args))
    assert rc == 3, stderr[-2000:]
    resumed = int(stdout.split(" resumed from saved work")[0].rsplit("(", 1)[1])
    assert resumed >= saved * BATCH
    _same_output(out, local)


@pytest.mark.slow
def test_eval_ijb_extracts_on_ray(cluster, mbf_pkg, tmp_path):
    import json

    from arcdeploy.demo.datasets import write_ijb_set

    root = write_ijb_set(
        tmp_path / "IJB_release" / "IJBC",
        target="IJBC",
        identities=4,
        templates_per_id=2,
        images_per_template=3,
        seed=0,
    )
    docs = []
    for name, extra in (("local", []), ("ray", ["--ray", cluster.address])):
        js = tmp_path / f"{name}.json"
        args = [
            "eval",
            "ijb",
            str(mbf_pkg),
            "--root",
            str(root),
            "--batch",
            "4",
            "--no-progress",
            "--json",
            str(js),
            "-o",
            str(tmp_path / name),
            *extra,
        ]
        if extra:
            rc, _, stderr = _finish(_start(args))
            assert rc == 0, stderr[-2000:]
        else:
            assert main(args) == 0
        docs.append(json.loads(js.read_text()))
    a, b = (np.load(d["features_file"]) for d in docs)
    assert a.shape == (24, 2, 512) and np.isfinite(a).all()
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)  # the local run here used the engine's own threads
    assert docs[0]["tar"] == docs[1]["tar"]


@pytest.mark.slow
def test_broken_package_is_one_line_naming_it(cluster, mbf_pkg, job, tmp_path):
    broken = tmp_path / "broken_pkg"
    shutil.copytree(mbf_pkg, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    rc, _, stderr = _finish(_start(_args(broken, job, tmp_path / "feats.npy", "--ray", cluster.address)))
    assert rc == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("arcdeploy embed: error: ") and str(broken) in last, stderr[-2000:]
    assert "Traceback" not in stderr


def test_without_ray_it_says_what_to_install(monkeypatch, tmp_path, capsys):
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # import ray -> ImportError
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), np.zeros((112, 112, 3), np.uint8))
    rc = main(["embed", str(tmp_path / "pkg"), "--images", str(img), "--ray", "-o", str(tmp_path / "f.npy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'arcdeploy[ray]'" in err[0]


@pytest.mark.slow
@needs_real("models/scrfd_500m_kps.onnx", "faces/photos")
def test_detector_travels_to_the_workers(cluster, mbf_pkg, tmp_path):
    """--detector on the cluster: the detector file goes with the package and each actor finds the
    faces itself; rows and failures equal the local run's (a blank image has no face)."""
    photos = tmp_path / "photos"
    shutil.copytree(REAL / "faces" / "photos", photos)
    cv2.imwrite(str(photos / "blank.png"), np.full((200, 200, 3), 90, np.uint8))
    scrfd = REAL / "models" / "scrfd_500m_kps.onnx"
    common = [
        "embed",
        str(mbf_pkg),
        "--images",
        str(photos),
        "--detector",
        str(scrfd),
        "--batch",
        str(BATCH),
        "--threads",
        "1",
        "-q",
    ]
    local_out, ray_out = tmp_path / "local" / "feats.npy", tmp_path / "ray" / "feats.npy"
    assert main([*common, "-o", str(local_out)]) == 3
    rc, _, stderr = _finish_on_loopback(_start([*common, "-o", str(ray_out), "--ray", cluster.address]))
    assert rc == 3, stderr[-2000:]
    _same_output(ray_out, local_out)
    assert "blank.png" in ray_out.with_name("feats.failures.tsv").read_text() and "no face found" in stderr


@pytest.mark.slow
@needs_real("models/scrfd_500m_kps.onnx", "faces/photos")
def test_detector_settings_travel_to_the_workers(cluster, mbf_pkg, tmp_path):
    """Every setting of the detector reaches the actors, not just its file: a job whose SCRFD runs
    on a 320x320 canvas gives, on the cluster, the rows of the local run at 320x320 (which differ
    from those at the default 640x640, so a dropped size would show)."""
    import arcdeploy
    from arcdeploy.distributed import RayOptions, run_on_ray
    from arcdeploy.faces import EmbedJob, list_images, run_local
    from arcdeploy.faces.detectors import DetectorSpec

    photos = list_images(REAL / "faces" / "photos")
    pkg = arcdeploy.load(mbf_pkg, threads=1)
    scrfd = REAL / "models" / "scrfd_500m_kps.onnx"
    small = EmbedJob.create(photos, detector=DetectorSpec(scrfd, input_size=(320, 320)), batch=BATCH, progress=False)
    default = EmbedJob.create(photos, detector=DetectorSpec(scrfd), batch=BATCH, progress=False)
    want = run_local(small, pkg).features
    assert not np.allclose(want, run_local(default, pkg).features, atol=1e-3)
    got = run_on_ray(small, pkg, RayOptions(address=cluster.address, threads=1))
    assert got.actors >= 1 and not got.failures
    assert np.array_equal(got.features, want)


@pytest.mark.slow
def test_threads_the_cluster_cannot_place_are_refused_at_once(cluster, mbf_pkg, job, tmp_path):
    """--threads above every node's CPUs: one line before any actor starts, not a wait forever."""
    out = tmp_path / "feats.npy"
    args = _args(mbf_pkg, job, out, "--ray", cluster.address)
    args[args.index("--threads") + 1] = "2"  # the nodes have one CPU each
    earlier = frozenset(_embedder_pids())  # only an actor this command started counts against it
    t0 = time.monotonic()
    rc, _, stderr = _finish(_start(args), timeout=120)
    assert rc == 2 and time.monotonic() - t0 < 90, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--threads 2" in lines[0] and "has 1" in lines[0], stderr
    assert not out.exists() and not _embedder_pids(earlier)


@pytest.mark.slow
def test_no_address_starts_a_local_ray_and_stops_it(ray_env, mbf_pkg, short_job, short_local, tmp_path):
    """Without --ray ADDRESS the command starts a Ray of its own on loopback and stops it: no process
    of it is left, and (without RAY_TMPDIR) its files were in a private folder of the temp folder,
    removed when the job ends (Ray alone leaves /tmp/ray/session_* behind)."""
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="ardses-", dir="/tmp"))  # short: Ray's socket paths
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
        env["TMPDIR"] = str(tmp)
        before = set(Path("/tmp/ray").glob("session_*")) if Path("/tmp/ray").exists() else set()
        ours_before = set(Path("/tmp").glob("arcdeploy-ray-*"))
        out = tmp_path / "feats.npy"
        rc, stdout, stderr = _finish_on_loopback(_start(_args(mbf_pkg, short_job, out, "--ray"), env=env))
        assert rc == 3, stderr[-2000:]
        _same_output(out, short_local)
        assert "ray: 1 node(s)" in stdout

        def left() -> list[str]:
            return [
                f"{p.info['pid']} {p.info['name']}"
                for p in psutil.process_iter(["pid", "name", "cmdline"])
                if any(str(tmp) in a for a in p.info["cmdline"] or [])
            ]

        end = time.monotonic() + 10  # its last processes may take a moment to exit after the command
        while (still := left()) and time.monotonic() < end:
            time.sleep(0.2)
        assert not still, still  # the Ray the command started is gone with it
        after = set(Path("/tmp/ray").glob("session_*")) if Path("/tmp/ray").exists() else set()
        assert after <= before
        assert not list(tmp.glob("arcdeploy-*")) and not list(tmp.glob("session_*")), list(tmp.iterdir())
        assert set(Path("/tmp").glob("arcdeploy-ray-*")) <= ours_before
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
