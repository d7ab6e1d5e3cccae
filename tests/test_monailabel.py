"""A real MONAI Label server serves this bundle: the fibrosis label map, the follow-up CT beside it, the numbers.

``test_real_monai_label_server_...`` (marker ``monailabel``) starts ``monailabel start_server``
(MONAI Label 0.8.5, its ``monaibundle`` sample app) on 127.0.0.1 with this bundle in the app's
model folder and one synthetic CT in the studies folder, asks ``/info/``, runs
``/infer/cirresdiff_ipf`` on the study with a lung-function record, checks what comes back, and
stops the server. It installs nothing: MONAI Label is the overlay of ``requirements-label.txt``
that ``.ci/run`` installs (``pip install --no-deps --ignore-installed --prefix``; why an overlay:
that file's header) and names in ``CIRRESDIFF_LABEL_PREFIX``. Without that variable the test is
skipped; ``.ci/run`` runs it as a step of its own that fails on a skip. The server process alone
gets the overlay and ``tests/label_shim/`` (the torchvision shim) on ``PYTHONPATH``.

The other tests here need no server: the metadata and configs that MONAI Label reads.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cirresdiff_bundle import predict_followup
from custom.clinical.text import record_to_text
from custom.fibrosis import FIBROSIS_LABELS

PREFIX_ENV = "CIRRESDIFF_LABEL_PREFIX"
"""Environment variable naming the overlay prefix of ``requirements-label.txt`` (set by ``.ci/run``)."""
MODEL = "cirresdiff_ipf"
"""The bundle's folder name under the app's ``model/``: MONAI Label's model name."""
BUNDLE_PARTS = ("configs", "custom", "models")
"""What the server needs of the bundle (docs, tests and the front-door package stay out)."""
SHIM = Path(__file__).resolve().parent / "label_shim"
RECORD = {"FVC": 2300, "Percent": 62.0, "Age": 71, "Sex": "Male", "SmokingStatus": "Ex-smoker"}
STUDY = "SYN0000"
START_TIMEOUT_S = 180
INFER_TIMEOUT_S = 600


def server_command(app: Path, studies: Path, port: int) -> list[str]:
    """``monailabel start_server`` as the test runs it (the ``monailabel`` script runs ``python -m monailabel.main``).

    ``zoo_source ngc``: with the default (``monaihosting``) MONAI Label lists the model zoo online
    at start-up and fails offline; with ``ngc`` a folder ``model/<name>`` is used as it is.
    ``skip_trainers``: the infer task is what is served here. ``sam2 false``: no SAM2 model, even
    where the ``sam2`` package is installed.
    """
    return [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
            "--conf", "models", MODEL, "--conf", "zoo_source", "ngc", "--conf", "skip_trainers", "true",
            "--conf", "sam2", "false", "--host", "127.0.0.1", "--port", str(port)]


def overlay_paths(prefix: Path) -> list[str]:
    """The overlay's site-packages folders (as ``pip install --prefix`` lays them out)."""
    scheme = {"base": str(prefix), "platbase": str(prefix)}
    paths = [sysconfig.get_path(kind, "posix_prefix", vars=scheme) for kind in ("purelib", "platlib")]
    return list(dict.fromkeys(paths))


def copy_app_and_bundle(prefix: Path, bundle_root: Path, app: Path) -> Path:
    """The ``monaibundle`` sample app from the overlay, this bundle as ``model/cirresdiff_ipf`` in it.

    The copy's ``inference.json`` uses the ``small`` grid (custom/grid.py): it holds the whole lung
    region of the test's small synthetic chest (``custom.synthetic.SMALL_BODY_SCALE``) in one
    mean-prediction pass, a few seconds instead of about 20 s for the shipped ``adult`` grid on 2
    cores, and exercises the same code. MONAI Label reads only ``configs/inference.json`` and offers
    no override of its values, so the copy is edited.
    """
    source = prefix / "monailabel" / "sample-apps" / "monaibundle"
    assert (source / "main.py").is_file(), f"no monaibundle sample app under {prefix} (see requirements-label.txt)"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(source, app, ignore=skip)
    bundle = app / "model" / MODEL
    for part in BUNDLE_PARTS:
        shutil.copytree(bundle_root / part, bundle / part, ignore=skip)
    config = bundle / "configs" / "inference.json"
    values = json.loads(config.read_text(encoding="utf-8"))
    values["grid"] = "small"
    config.write_text(json.dumps(values, indent=4), encoding="utf-8")
    return bundle


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_form(url: str, fields: dict[str, str], timeout: float) -> tuple[str, bytes]:
    """POST ``fields`` as multipart/form-data (what MONAI Label's clients send); the reply's type and body."""
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                    for name, value in fields.items()) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return reply.headers["Content-Type"], reply.read()


def multipart_parts(content_type: str, body: bytes) -> dict[str, bytes]:
    """The parts of MONAI Label's multipart infer reply (``params``: the JSON result, ``image``: the result file)."""
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body,
                                       policy=email.policy.HTTP)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()}


def wait_for_info(url: str, server: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.loads(reply.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"no answer from {url} within {START_TIMEOUT_S} s:\n{tail(log)}")


def tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]) if log.is_file() else ""


def stop(server: subprocess.Popen) -> None:
    """Terminate the server (SIGTERM), then kill it; its own process group goes with it."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # anything it started in its session (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.mark.monailabel
def test_real_monai_label_server_serves_the_fibrosis_label_map_and_the_followup(bundle_root, raw_case, tmp_path):
    prefix = os.environ.get(PREFIX_ENV)
    if not prefix:
        pytest.skip(f"{PREFIX_ENV} is not set: .ci/run's step 'MONAI Label server' installs requirements-label.txt "
                    f"as an overlay and runs this test with it (pytest -m monailabel)")
    prefix = Path(prefix).resolve()
    app, studies = tmp_path / "monaibundle", tmp_path / "studies"
    copy_app_and_bundle(prefix, bundle_root, app)
    studies.mkdir()
    shutil.copy(raw_case, studies / f"{STUDY}.nii.gz")
    study = nib.load(str(studies / f"{STUDY}.nii.gz"))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*overlay_paths(prefix), str(SHIM)]),
           "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
    log = tmp_path / "server.log"
    timings = {}
    start = time.monotonic()
    with open(log, "wb") as out:
        server = subprocess.Popen(server_command(app, studies, port), cwd=tmp_path, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        info = wait_for_info(f"{base}/info/", server, log)
        timings["info"] = time.monotonic() - start
        model = info["models"][MODEL]
        labels = {name: value for name, value in FIBROSIS_LABELS.items() if name != "background"}
        assert model["labels"] == labels and model["type"] == "segmentation" and model["dimension"] == 3
        # only the image-to-image network's weights are a choice; the classifier lives in models/classifier/
        assert model["config"]["model_filename"] == ["model.pt"]

        start = time.monotonic()
        query = urllib.parse.urlencode({"image": STUDY})
        try:
            content_type, body = post_form(f"{base}/infer/{MODEL}?{query}", {"params": json.dumps({"record": RECORD})},
                                           timeout=INFER_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            pytest.fail(f"/infer/ answered {e.code}: {e.read()[-2000:]!r}\n{tail(log)}")
        timings["infer"] = time.monotonic() - start
    finally:
        start = time.monotonic()
        stop(server)
        timings["stop"] = time.monotonic() - start
    print(f"MONAI Label server: /info/ after {timings['info']:.1f} s, /infer/ {timings['infer']:.1f} s, "
          f"stopped in {timings['stop']:.1f} s")

    parts = multipart_parts(content_type, body)
    result = json.loads(parts["params"])
    (tmp_path / "result.nii.gz").write_bytes(parts["image"])
    returned = nib.load(str(tmp_path / "result.nii.gz"))
    # the result is the label map, in the study's own voxels and position
    assert returned.shape == study.shape and np.allclose(returned.affine, study.affine, atol=1e-4)
    label_map = np.asarray(returned.dataobj)
    assert np.issubdtype(label_map.dtype, np.integer) and set(np.unique(label_map)) <= set(FIBROSIS_LABELS.values())
    assert (label_map > 0).any()
    assert result["label_names"] == labels
    # the record reached the model (the text, which MONAI Label's inferer call gets through the image's metadata)
    assert result["text"] == record_to_text(RECORD) and result["patient"] == STUDY
    haa = result["fibrosis"]
    assert 0.0 <= haa["haa_percent_initial"] <= 100.0 and 0.0 <= haa["haa_percent_followup"] <= 100.0
    assert haa["new_fibrosis_ml"] >= 0.0 and haa["lung_volume_ml"] > 0.0
    voxel_ml = float(np.prod(np.abs(np.diag(study.affine)[:3]))) / 1000.0
    assert haa["new_fibrosis_ml"] == pytest.approx(np.count_nonzero(label_map == 2) * voxel_ml, rel=1e-6)
    forecast = result["fvc_forecast"]  # the record's FVC forecast at inference.json's default interval
    assert forecast["weeks"] == 52 and 0 < forecast["fvc_ml"] < 10_000 and forecast["sd_ml"] >= 70
    if (bundle_root / "models" / "classifier" / "model.pt").is_file():
        assert 0.0 <= result["progression_probability"] <= 1.0
    # beside it, the bundle's own outputs: the follow-up CT in HU and the same label map
    files = result["files"]
    followup = nib.load(files["followup"])
    assert Path(files["followup"]).name == "followup.nii.gz" and followup.shape == study.shape
    assert np.allclose(followup.affine, study.affine, atol=1e-4)
    hu = np.asarray(followup.dataobj, dtype=np.float32)
    assert np.array_equal(np.asarray(nib.load(files["fibrosis"]).dataobj), label_map)
    assert Path(files["fibrosis_figure"]).stat().st_size > 10_000
    # it is the bundle's own inference with that record (the record moves the follow-up by more than the tolerance)
    with_record, without = (predict_followup(raw_case, rec, grid="small")[0]["followup"] for rec in (RECORD, None))
    assert np.abs(hu - with_record).max() < 0.05 < 0.5 < np.abs(hu - without).max()


def test_metadata_gives_monai_label_the_labels_and_the_zoo_the_network_output(bundle_root):
    """MONAI Label's bundle infer task takes its labels from the *first* output of ``network_data_format``
    ("background" dropped); ``verify_net_in_out`` and ``ckpt_export`` read ``outputs#pred`` by name."""
    outputs = json.loads((bundle_root / "configs" / "metadata.json").read_text(encoding="utf-8"))[
        "network_data_format"]["outputs"]
    first, label_map = next(iter(outputs.items()))
    assert first == "fibrosis" and label_map["dtype"] == "uint8" and not label_map["is_patch_data"]
    assert {name: int(value) for value, name in label_map["channel_def"].items()} == FIBROSIS_LABELS
    assert outputs["pred"]["num_channels"] == 1 and outputs["pred"]["dtype"] == "float32"


def test_monai_label_reads_post_transforms_ending_with_the_label_map(bundle_root, tmp_path):
    """``post_transforms`` is ``postprocessing`` plus ``MonaiLabelResultd``; ``device`` may be a string, as
    MONAI Label writes it; no ``models/*.pt`` besides ``model.pt`` (each would be offered as weights)."""
    from monai.bundle import ConfigParser

    from custom.inference import MonaiLabelResultd

    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "output_dir": str(tmp_path), "device": "cpu"})
    post = parser.get_parsed_content("post_transforms").transforms
    assert [type(t) for t in post[:-1]] == [type(t) for t in parser.get_parsed_content("postprocessing").transforms]
    assert isinstance(post[-1], MonaiLabelResultd)
    assert parser.get_parsed_content("channels_last") is True
    assert sorted(p.name for p in (bundle_root / "models").glob("*.pt")) == ["model.pt"]
