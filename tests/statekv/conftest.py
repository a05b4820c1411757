"""Store fixtures: a session-scoped loopback S3 server (moto) and a store root that is a local dir or a bucket."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """(endpoint_url, StorageOptions) of a moto S3 server on 127.0.0.1, with one bucket "caches"."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    from statekv.store import StorageOptions

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the server accepts connections
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = StorageOptions(endpoint_url=endpoint, key="testing", secret="testing", region="us-east-1")
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="caches")
    yield endpoint, options
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """(root URI, storage options): a fresh local directory or a fresh prefix in the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "caches"), None
    _, options = request.getfixturevalue("s3_server")
    return f"s3://caches/{uuid.uuid4().hex}", options
