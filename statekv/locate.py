"""Where a checkpoint comes from and where it runs, decided before anything heavy loads.

A name is a local directory (stored resolved, so a cache made from `./ckpt` still finds it from another folder), a
hub id already in the Hugging Face cache (loaded with no network at all), or a hub id fetched from a hub that has
answered one quick probe. Anything else fails at once with one line naming the model, instead of the hub client's
half-minute of retries and an error that does not say which model it was looking for. Imports only the standard
library at module level: the command line calls `locate_checkpoint` before torch is even imported.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from statekv.errors import DeviceError, ModelNotFoundError

logger = logging.getLogger(__name__)

# from_pretrained arguments that say where files come from: config, tokenizer and weights must all get them
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "subfolder",
              "trust_remote_code")
HUB_PROBE_TIMEOUT_S = 5.0  # one HEAD request to the hub endpoint; a reachable hub answers in well under a second
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")
TINY_MODEL_HINT = "for a tiny random test model run `statekv tiny-model --list`"


def looks_like_path(name: str) -> bool:
    """True for names that can only mean a local path: `./x`, `~/x`, `/x`, `a/b/c`, `C:\\x`, or not a repo id."""
    return (name.startswith((".", "~", "/", os.sep)) or "\\" in name or name.count("/") > 1
            or not _REPO_ID.fullmatch(name) or name.endswith((".", "-")))


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The location arguments in `kwargs` (revision, token, cache_dir, ...), for AutoConfig and AutoTokenizer."""
    return {k: v for k, v in kwargs.items() if k in HUB_KWARGS}


def locate_checkpoint(name: str | os.PathLike, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """(name to load, from_pretrained kwargs) for a checkpoint, or ModelNotFoundError naming it and the reason.

    A local directory comes back absolute. A hub id found in the local cache (for `revision`, in `cache_dir`)
    comes back with `local_files_only=True`; one not cached is returned as is only when the hub answers.
    """
    name = os.fspath(name)
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return os.path.abspath(local), kwargs
    if os.path.exists(local):
        raise ModelNotFoundError(name, "is a file; a checkpoint is a directory with config.json and weights")
    if looks_like_path(name):
        raise ModelNotFoundError(name, f"no such directory ({TINY_MODEL_HINT})")
    if _cached(name, kwargs):
        return name, {**kwargs, "local_files_only": True}
    if kwargs.get("local_files_only") or _offline():
        why = "local_files_only is set" if kwargs.get("local_files_only") else "HF_HUB_OFFLINE is set"
        raise ModelNotFoundError(name, f"not a local directory and not in the Hugging Face cache ({why}; "
                                       f"{TINY_MODEL_HINT})")
    unreachable = _hub_unreachable()
    if unreachable:
        raise ModelNotFoundError(name, f"not a local directory, not in the Hugging Face cache, and the hub is "
                                       f"unreachable ({unreachable}; {TINY_MODEL_HINT})")
    return name, kwargs


def _cached(repo_id: str, kwargs: dict[str, Any]) -> bool:
    """Whether the hub cache holds this repo's config.json at the requested revision."""
    from huggingface_hub import try_to_load_from_cache

    if kwargs.get("force_download"):
        return False
    subfolder = kwargs.get("subfolder") or ""
    found = try_to_load_from_cache(repo_id, f"{subfolder}/config.json" if subfolder else "config.json",
                                   cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
    return isinstance(found, str)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_unreachable() -> str | None:
    """None when the hub endpoint answers one HEAD request, else why not (no retries: the caller fails fast)."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.HTTPError as err:  # DNS failure, refused, timed out, TLS: every way of not getting an answer
        return f"{constants.ENDPOINT}: {type(err).__name__}" + (f": {err}" if str(err) else "")
    return None


def check_device(device: Any) -> Any:
    """`torch.device(device)` if this torch can use it, else DeviceError (e.g. cuda on a CPU-only torch build)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(device, str(err).splitlines()[0]) from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise DeviceError(device, f"this torch ({torch.__version__}) is a CPU-only build; use --device cpu "
                                      "or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceError(device, "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver)")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(device, f"only {count} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(device, "MPS is not available on this machine")
    return dev
