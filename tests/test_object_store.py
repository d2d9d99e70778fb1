"""A store on an object store, for real: a local S3-compatible server (moto's server mode, localhost, a free port),
the tiny trained teacher cached into ``s3://bucket/store.zarr`` by 2 dask worker processes, verified, a student
trained from it, and every entry compared bit for bit with a local store written the same way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from teachcache.cli import app
from tests.conftest import derived_config

moto = pytest.importorskip("moto", reason="moto[server] (a test dependency in .[dev]) is not installed")
s3fs = pytest.importorskip("s3fs", reason="s3fs (the teachcache[s3] extra) is not installed")

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on localhost; credentials and endpoint in the standard environment variables (as a user
    would set them for a real bucket), inherited by the dask workers."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_ENDPOINT_URL", "TEACHCACHE_CACHE_DIR")}  # fmt: skip
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "TEACHCACHE_CACHE_DIR": str(
                tmp_path_factory.mktemp("tc_cache")
            ),  # the remote store's lock lives here
        }
    )
    try:
        for _ in range(100):  # the server is up when it answers
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _arrays(location: str) -> dict[str, np.ndarray]:
    root = zarr.open_group(location, mode="r", use_consolidated=False)
    found = {}
    for teacher, copies in root["teachers"].groups():
        for slot, group in copies.groups():
            for case, entry in group.groups():
                for name, arr in entry.arrays():
                    found[f"{teacher}/{slot}/{case}/{name}"] = arr[...]
    return found


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0 and "Traceback" not in result.output, (args, result.output)
    return result.output


def test_cache_verify_and_distil_on_s3_match_a_local_store_bit_for_bit(s3, trained):
    root, data = trained
    teachers = [data["teachers"][2]]  # dynunet
    local, local_path = derived_config(root, data, "s3_twin_local", teachers=teachers)
    remote, remote_path = derived_config(
        root, data, "s3_twin_remote", teachers=teachers, **{"store.path": "s3://bucket/store.zarr"}
    )
    for cfg_path in (local_path, remote_path):
        _cli("preprocess", "-c", str(cfg_path), "-q")
        _cli("cache", "-c", str(cfg_path), "-t", "dynunet", "--workers", "2", "-q")
    assert s3.exists("bucket/store.zarr/zarr.json") and not Path("s3:").exists()
    assert "ok:" in _cli("verify", "s3://bucket/store.zarr", "-c", str(remote_path))
    a, b = _arrays(local.store.path), _arrays("s3://bucket/store.zarr")
    assert a.keys() == b.keys() and len(a) == 6 * 3
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    _cli("distil", "-c", str(remote_path), "--fold", "0", "-q")
    summary = next(Path(remote.output.runs_dir, "students").rglob("summary.json"))
    assert '"store": "s3://bucket/store.zarr"' in summary.read_text()


@pytest.mark.parametrize("what", ["misspelt bucket", "missing credentials"])
def test_a_bucket_that_cannot_be_used_is_one_message(s3, trained, tmp_path, monkeypatch, what):
    root, data = trained
    location = "s3://no-such-bucket/store.zarr" if what == "misspelt bucket" else "s3://bucket/other.zarr"
    if what == "missing credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()  # no client made with the good settings is reused
    _, path = derived_config(root, data, f"s3_bad_{what.split()[0]}", **{"store.path": location})
    expected = {
        "misspelt bucket": "the bucket 'no-such-bucket' does not exist",
        "missing credentials": "NoCredentialsError",
    }[what]
    for command in (["ls", location], ["verify", location], ["preprocess", "-c", str(path), "-q"]):
        result = runner.invoke(app, command)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
        assert expected in output or "cannot create a store" in output, (command, output)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_bucket_these_credentials_may_only_read_is_one_message(s3, trained, monkeypatch):
    """S3 answers a write without permission with AccessDenied, which s3fs raises as a PermissionError: `cache`
    and `preprocess` say the bucket cannot be written with these credentials; reading commands still work."""
    root, data = trained
    location = "s3://bucket/read_only.zarr"
    _, path = derived_config(root, data, "s3_read_only", **{"store.path": location})
    _cli("preprocess", "-c", str(path), "-q")

    async def denied(self, path, data, *args, **kwargs):  # what s3fs raises for S3's AccessDenied
        raise PermissionError("Access Denied")

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", denied)
    s3fs.S3FileSystem.clear_instance_cache()
    _, new_path = derived_config(root, data, "s3_read_only_new", **{"store.path": "s3://bucket/new.zarr"})
    for command, where in (
        (["cache", "-c", str(path), "-q"], location),
        (["preprocess", "-c", str(new_path), "-q"], "s3://bucket/new.zarr"),
    ):
        result = runner.invoke(app, command)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
        assert f"{where} cannot be written with these credentials (Access Denied)" in output, output
    assert not s3.exists("bucket/new.zarr/zarr.json"), "nothing half-written"
    listing = runner.invoke(app, ["ls", location])
    assert listing.exit_code == 0, listing.output
