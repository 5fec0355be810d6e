"""The shared DVC remote: `shrinkflow remote check` and `push`, and a dead one stops a run in
one line before any job. (A Snakemake run that pushes its checkpoints there, and a second clone
that pulls them and re-runs nothing: tests/test_report_mlflow_server.py, on its DAG.)"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow_server import free_port
from projects import BIN, make_project, run, tool_env


def call(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` as :func:`projects.run` does, whatever its exit status."""
    return subprocess.run(cmd, cwd=cwd, env=tool_env(**env), capture_output=True, text=True)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error" in line.lower()]


@pytest.fixture
def dvc_project(tmp_path) -> Path:
    """An empty DVC project without git (only its config matters here)."""
    project = tmp_path / "project"
    project.mkdir()
    run([str(BIN / "dvc"), "init", "--no-scm", "-q"], project)
    return project


def add_remote(project: Path, name: str, url: str, *extra: str) -> None:
    run([str(BIN / "dvc"), "remote", "add", "-d", name, url], project)
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        run([str(BIN / "dvc"), "remote", "modify", name, key, value], project)


def check(project: Path, *args: str) -> subprocess.CompletedProcess:
    return call([str(BIN / "shrinkflow"), "remote", "check", *args], project)


def test_a_writable_shared_folder_passes_and_is_left_as_it_was(dvc_project, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    add_remote(dvc_project, "shared", str(shared))
    result = check(dvc_project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dvc remote 'shared' ({shared}): writable"
    assert list(shared.iterdir()) == []  # the probe file is gone
    # a relative path is shown resolved; a folder that does not exist yet is fine (DVC makes
    # it on the first push) where its parent is writable
    add_remote(dvc_project, "beside", "../beside")
    result = check(dvc_project, "--remote", "beside")
    assert result.stdout.strip() == (
        f"dvc remote 'beside' ({tmp_path / 'beside'}): writable (created on the first push)"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("{tmp}/unmounted/share/dvc", "{tmp}/unmounted does not exist (is the shared file"),
        ("{tmp}/a-file", "{tmp}/a-file is not a folder"),
        ("{tmp}/a-file/dvc", "{tmp}/a-file is not a folder"),
        ("/proc/shrinkflow-dvc", "cannot write in /proc:"),  # read-only, even for root
    ],
)
def test_a_dead_shared_folder_is_one_line_naming_the_remote(dvc_project, tmp_path, url, expected):
    (tmp_path / "a-file").write_text("not a folder\n")
    url = url.format(tmp=tmp_path)
    add_remote(dvc_project, "shared", url)
    result = check(dvc_project)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: dvc remote 'shared' ({url}): {expected.format(tmp=tmp_path)}")
    assert not (tmp_path / "unmounted").exists()  # nothing was created on the way


def test_no_remote_or_an_unknown_one_is_one_line(dvc_project, tmp_path):
    result = check(dvc_project)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: no default DVC remote: set one with `dvc remote add -d NAME URL` (configured: none)"
    ]
    add_remote(dvc_project, "shared", str(tmp_path))
    result = check(dvc_project, "--remote", "sahred")
    assert result.stderr.splitlines() == [
        "error: dvc remote 'sahred' is not configured (configured: shared)"
    ]


def test_an_unreachable_s3_remote_is_one_line(dvc_project):
    """Without dvc-s3 the line says what to install; with it, the endpoint (a free port that
    nothing listens on) refuses the probe object."""
    url = "s3://shrinkflow/dvc"
    endpoint = f"http://127.0.0.1:{free_port()}"
    add_remote(dvc_project, "s3", url, "endpointurl", endpoint)
    result = check(dvc_project)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    if importlib.util.find_spec("dvc_s3") is None:
        assert line == f"error: dvc remote 's3' ({url}): s3 is supported, but requires " + (
            "'dvc-s3' to be installed"
        )
    else:
        assert line.startswith(f"error: dvc remote 's3' ({url}): cannot write a probe object:")


@contextmanager
def s3_server(tmp_path: Path) -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port, in its own process group; yields its URL."""
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_an_s3_remote_is_checked_pushed_and_pulled(dvc_project, tmp_path, monkeypatch):
    """A real S3 API (moto's server): the check writes and deletes a probe object, `shrinkflow
    remote push` commits and pushes, `dvc pull` brings the bytes back; a missing bucket is one
    line. Needs the optional s3 extra (dvc-s3) and moto[server]."""
    pytest.importorskip("dvc_s3")
    pytest.importorskip("moto.server")
    import boto3

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")  # moto accepts any credentials
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with s3_server(tmp_path) as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="shrinkflow")
        add_remote(dvc_project, "s3", "s3://shrinkflow/dvc", "endpointurl", endpoint)
        assert (
            check(dvc_project).stdout.strip() == "dvc remote 's3' (s3://shrinkflow/dvc): writable"
        )
        checkpoint = dvc_project / "model.pt"
        checkpoint.write_bytes(os.urandom(4096))
        before = checkpoint.read_bytes()
        run([str(BIN / "dvc"), "add", "-q", "model.pt"], dvc_project)
        run([str(BIN / "shrinkflow"), "remote", "push"], dvc_project)
        objects = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="shrinkflow")
        keys = [o["Key"] for o in objects["Contents"]]
        assert keys and all(k.startswith("dvc/files/md5/") for k in keys)  # no probe left
        shutil.rmtree(dvc_project / ".dvc/cache")
        checkpoint.unlink()
        run([str(BIN / "dvc"), "pull", "-q"], dvc_project)
        assert checkpoint.read_bytes() == before
        add_remote(dvc_project, "gone", "s3://no-such-bucket/dvc", "endpointurl", endpoint)
        result = check(dvc_project)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            "error: dvc remote 'gone' (s3://no-such-bucket/dvc): cannot write a probe object: "
            "The specified bucket does not exist"
        ]


def test_a_dead_remote_stops_snakemake_before_any_job(tmp_path):
    project = make_project(tmp_path)
    add_remote(project, "shared", str(tmp_path / "unmounted/share"))
    result = call(
        [str(BIN / "snakemake"), "--profile", "workflow/profiles/local", "--cores", "2"],
        project,
        SHRINKFLOW_DVC_PUSH="1",
    )
    assert result.returncode != 0
    assert error_lines(result) == [
        f"error: dvc remote 'shared' ({tmp_path}/unmounted/share): {tmp_path}/unmounted does "
        "not exist (is the shared file system mounted?)"
    ], result.stderr
    assert not [p for p in ("results", "logs", "mlflow.db") if (project / p).exists()]
    # a run with overrides cannot be recorded in dvc.lock (dvc.yaml reads params.yaml only)
    add_remote(project, "beside", str(tmp_path / "store"))
    preset = tmp_path / "preset.yaml"
    preset.write_text("evaluate: {repeats: 4}\n")
    result = call(
        [str(BIN / "snakemake"), "-n", "--cores", "2", "--configfile", str(preset)],
        project,
        SHRINKFLOW_DVC_PUSH="1",
    )
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert line.startswith("error: SHRINKFLOW_DVC_PUSH=1 records this run in dvc.lock")
    assert f"(--configfile {os.path.relpath(preset, project)})" in line
    # without the opt-in, Snakemake never reads DVC's config
    result = call([str(BIN / "snakemake"), "-n", "--cores", "2"], project)
    assert result.returncode == 0 and "dvc remote" not in result.stderr


def test_a_push_of_a_partial_workspace_is_one_line_and_keeps_it(tmp_path):
    project = make_project(tmp_path)
    add_remote(project, "shared", str(tmp_path / "store"))
    result = call([str(BIN / "shrinkflow"), "remote", "push"], project)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: dvc commit to remote 'shared' failed: failed to commit - output "
        "'data/raw/digits' does not exist (the outputs stay in place; run `make push` again "
        "once fixed)"
    ]
    assert not (tmp_path / "store").exists()
