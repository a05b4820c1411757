"""Starting or joining the Ray cluster a job runs on, shared by indexing and serving.

Joining a running cluster (`--address`) differs from starting a local one in two ways a user hits at once:

- **Credentials.** A local cluster's workers are children of this process and see its environment; a cluster that
  was started elsewhere does not. The storage variables of this process (AWS_* credentials, region, endpoint) go to
  the job's workers and Serve replicas through the job's runtime environment (`runtime_env={"env_vars": ...}`),
  never on the command line or in a log line. (They are visible to whoever may read the cluster's job list, as any
  runtime environment is; instance roles / IRSA avoid passing keys at all.) A submitted job's driver already runs
  with the runtime env its submitter gave, so nothing is added there.
- **Token authentication (Ray 2.60).** `ray start --head` turns it on when a token exists (`~/.ray/auth_token`, which
  any local `ray.init` creates); a client then joins only with `RAY_AUTH_MODE=token` and the same token. Ray does
  not infer that for a client, so a join retried for 20 s and failed with a 30-line error. Here, when the mode is
  not set and a token is available, the mode is set to `token` for this process before joining (a token-mode client
  also joins a cluster without authentication), and a join that still fails is one line naming the address and
  what to set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

AUTH_MODE = "RAY_AUTH_MODE"
SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager for a submitted job's driver
# the variables boto / s3fs read for credentials, region and endpoint
STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CA_BUNDLE")


def storage_env() -> dict[str, str]:
    """This process's storage variables (names in `STORAGE_ENV`) that are set."""
    return {name: os.environ[name] for name in STORAGE_ENV if os.environ.get(name)}


def ray_token_available() -> bool:
    """Whether Ray would find an authentication token for this process: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH
    names, or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def join_error(address: str, err: BaseException) -> ConnectionError:
    """The one-line error of a join that failed, with what to check."""
    mode = os.environ.get(AUTH_MODE, "unset")
    token = "a token is available" if ray_token_available() else "no token found"
    return ConnectionError(
        f"cannot join the Ray cluster at {address!r} ({str(err).splitlines()[0] if str(err) else type(err).__name__}; "
        f"{AUTH_MODE}={mode}, {token}): is it running and reachable from here, and if it uses token authentication "
        f"(Ray turns it on for `ray start --head` when ~/.ray/auth_token exists), does this process have the same "
        f"token (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) with {AUTH_MODE}=token?")


def init_ray(address: str | None, **init_kwargs: Any) -> None:
    """Join the cluster at `address` ("auto": the one on this node), or start a local one (None): see the module
    docstring for what joining adds. A no-op when this process has initialised Ray already."""
    import ray

    if ray.is_initialized():
        return
    if not address:
        ray.init(**init_kwargs)
        return
    if AUTH_MODE not in os.environ and ray_token_available():
        os.environ[AUTH_MODE] = "token"
        # Ray reads its config when it is imported: re-read it (what Ray's own `ray start --head` does in this
        # case, `authentication_token_setup._enable_token_auth`; Ray's version is pinned in pyproject)
        from ray._raylet import Config

        Config.initialize("")
    env = storage_env()
    # a submitted job's driver runs with the runtime env its submitter gave (`ray job submit --runtime-env-json`),
    # its storage variables included: Ray refuses a second definition of them, so none is added there
    if env and SUBMITTED_JOB not in os.environ:
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
        init_kwargs["runtime_env"] = runtime_env
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as err:
        raise join_error(address, err) from err
