"""Shared fixtures: tiny random checkpoints written with save_pretrained, a loopback S3 server (moto), store roots."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402

from statekv.models import ADAPTERS  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
# what in a test's own source starts another Python process (the `subprocess` marker)
SPAWNS = ("subprocess.", "run_reporting_imports(", "sys.executable")


# fixtures that start Ray, by the xdist group their tests run in: the session's local cluster (`ray.init` in the
# test process: one per process, so its tests share one worker), and heads of their own (`ray start --head`,
# tests/infra/ray_head.py: their ports lie below the kernel's ephemeral range, where `ray.init`'s processes take
# theirs, and their temp dirs are their own, so they run beside the session cluster)
RAY_GROUPS = {"ray_cluster": "ray", "ray_head": "ray-heads", "token_head": "ray-heads"}
RAY_FIXTURES = set(RAY_GROUPS)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the `xdist_group` marks
def pytest_collection_modifyitems(config, items) -> None:
    """Mark tests by what they use, so that a developer's fast lane can leave them out (CI runs everything):
    `s3` (the loopback S3 server, also the "s3" case of `store_root`), `ray` (a Ray cluster: the session's, or a
    head a test starts) and `subprocess` (the test's body, or a helper of its module it calls, starts a Python
    process). The fast lane is in the README.

    Every `ray` test is also put in an `xdist_group` (RAY_GROUPS): under `pytest -n 2 --dist loadgroup` (the
    README's command) the tests of the session cluster run on one worker, in order, beside one cluster, as they
    would in a serial run; the tests that start heads of their own form a second group, and the rest spread over
    both workers."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "s3_server" in names or params.get("store_root") == "s3":
            item.add_marker(pytest.mark.s3)
        groups = sorted({RAY_GROUPS[name] for name in names & RAY_FIXTURES})
        if groups:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group(groups[0]))  # "ray" wins: the session cluster is per process
        function = getattr(item, "function", None)
        if function is not None and _spawns(function):
            item.add_marker(pytest.mark.subprocess)


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _spawns(function) -> bool:
    """Whether a test's body, or a function of its own module that it calls (`_run_prefill(...)`), starts a
    process."""
    source = _source(function)
    helpers = [v for name, v in vars(inspect.getmodule(function)).items()
               if inspect.isfunction(v) and v is not function and f"{name}(" in source
               and v.__module__ == function.__module__]
    return any(s in text for text in (source, *map(_source, helpers)) for s in SPAWNS)


@pytest.fixture(scope="session", autouse=True)
def shared_adapter_loads():
    """Each local checkpoint is loaded once per test process; later loads get a copy (tests/shared_adapters.py)."""
    import statekv.engine
    import statekv.models
    from tests.shared_adapters import SharedLoads

    if os.environ.get("STATEKV_TEST_FRESH_LOADS") == "1":
        yield None
        return
    real = statekv.models.load_adapter
    shared = SharedLoads(real)
    statekv.models.load_adapter = statekv.engine.load_adapter = shared
    yield shared
    statekv.models.load_adapter = statekv.engine.load_adapter = real


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """{family: path} of tiny random Qwen2-VL and Qwen2.5-VL checkpoints with a local tokenizer."""
    from statekv.testing.checkpoints import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: str(save_tiny_checkpoint(root / family, family)) for family in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_checkpoint(request, tiny_checkpoints) -> str:
    """Each tiny checkpoint in turn."""
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session", params=sorted(ADAPTERS))
def family_checkpoint(request, tmp_path_factory) -> str:
    """A tiny checkpoint of every family in the adapters registry, in turn (new families are tested for free)."""
    from statekv.testing.checkpoints import save_family_checkpoint

    return str(save_family_checkpoint(tmp_path_factory.mktemp("family") / request.param, request.param))


@pytest.fixture(scope="session")
def s3_server():
    """(endpoint_url, StorageOptions) of a moto S3 server on 127.0.0.1, with one bucket "caches"."""
    import boto3
    from moto import server as moto_server

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


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the whole session (pipeline and Serve tests); logical CPUs oversubscribed."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
