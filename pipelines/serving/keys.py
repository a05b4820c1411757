"""API keys of the query service: the key file's format, hashing and checking secrets, and the file as a running
service sees it (re-read when it changes, the last good set kept when it turns bad).

A key file is JSON, mounted into the replicas (a Kubernetes Secret, a file on each node), never in the Serve config:

    {"keys": [{"id": "team-a", "hash": "scrypt$16384$8$1$<salt>$<digest>", "roots": ["*"],
               "prefixes": ["a--"], "list": true, "limits": {"requests_per_s": 2}}]}

A secret is `<key id>.<random>`: the id in front lets the service check one slow hash (the key's), not one per key,
and lets a secret scanner recognise it. Only a slow salted hash of the secret is stored (scrypt or PBKDF2-SHA256
from the standard library); the secret is printed once, when the key is made (`statekv keys new`).

No Ray, no FastAPI here: `statekv keys` imports this module alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_KEY_ID = re.compile(KEY_ID_PATTERN)
MAX_SECRET_CHARS = 256  # a presented secret longer than this is refused before any hashing
ANY_ROOT = "*"
LIMIT_FIELDS = ("requests_per_s", "request_burst", "tokens_per_s", "token_burst", "max_concurrent")
_ENTRY_FIELDS = {"id", "hash", "roots", "prefixes", "list", "limits", "created", "note"}

# scrypt at n=2^14, r=8, p=1 (16 MiB, tens of ms): slow enough to make guessing from a stolen file expensive, and
# paid once per distinct secret a replica sees (auth.py keeps a fast digest of each verified secret)
SCRYPT_PARAMS = (2**14, 8, 1)
PBKDF2_ITERATIONS = 600_000


class KeyFileError(ValueError):
    """A key file that cannot be used: one line naming the file and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"key file {path}: {reason}")
        self.path, self.reason = path, reason


# --- secrets and their hashes ------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(secret: bytes, salt: bytes, params: list[str]) -> bytes:
    n, r, p = (int(x) for x in params)
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + (1 << 20), dklen=32)


def _pbkdf2(secret: bytes, salt: bytes, params: list[str]) -> bytes:
    (iterations,) = params
    return hashlib.pbkdf2_hmac("sha256", secret, salt, int(iterations), dklen=32)


# scheme name -> (derive(secret, salt, params), number of params)
HASH_SCHEMES: dict[str, tuple[Callable[[bytes, bytes, list[str]], bytes], int]] = {
    "scrypt": (_scrypt, 3), "pbkdf2_sha256": (_pbkdf2, 1)}


def hash_secret(secret: str, *, scheme: str = "scrypt") -> str:
    """`scheme$params...$salt$digest` of `secret` with a fresh 16-byte salt (what the key file stores)."""
    if scheme not in HASH_SCHEMES:
        raise ValueError(f"unknown hash scheme {scheme!r}; known: {sorted(HASH_SCHEMES)}")
    params = [str(x) for x in SCRYPT_PARAMS] if scheme == "scrypt" else [str(PBKDF2_ITERATIONS)]
    salt = secrets.token_bytes(16)
    digest = HASH_SCHEMES[scheme][0](secret.encode("utf-8"), salt, params)
    return "$".join([scheme, *params, _b64(salt), _b64(digest)])


def check_hash_format(encoded: str) -> None:
    """ValueError naming what is wrong with a stored hash (scheme, parameters, base64)."""
    parts = encoded.split("$") if isinstance(encoded, str) else []
    if not parts or parts[0] not in HASH_SCHEMES:
        raise ValueError(f"not a known hash (schemes: {', '.join(sorted(HASH_SCHEMES))}); store "
                         "`statekv keys new`'s output, never a plain secret")
    derive, nparams = HASH_SCHEMES[parts[0]]
    if len(parts) != nparams + 3:
        raise ValueError(f"a {parts[0]} hash has {nparams + 3} '$'-separated fields, this one {len(parts)}")
    if not all(p.isdigit() and int(p) > 0 for p in parts[1:1 + nparams]):
        raise ValueError(f"{parts[0]} parameters must be positive integers")
    try:
        salt, digest = (base64.b64decode(p, validate=True) for p in parts[-2:])
    except ValueError:
        raise ValueError("salt or digest is not base64") from None
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt or digest too short")
    if parts[0] == "scrypt":
        n = int(parts[1])
        if n & (n - 1) or n < 2 or int(parts[2]) * int(parts[3]) >= 1 << 30 or 128 * int(parts[2]) * n > 1 << 30:
            raise ValueError("scrypt n must be a power of 2 and memory at most 1 GiB")


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether `secret` hashes to `encoded` (a `hash_secret` string); the digests are compared in constant time."""
    parts = encoded.split("$")
    derive, nparams = HASH_SCHEMES[parts[0]]
    salt, want = base64.b64decode(parts[-2]), base64.b64decode(parts[-1])
    got = derive(secret.encode("utf-8", "surrogatepass"), salt, parts[1:1 + nparams])
    return hmac.compare_digest(got, want)


def new_secret(key_id: str) -> str:
    """A fresh secret for `key_id`: `<key id>.<43 random URL-safe characters>` (256 bits)."""
    check_key_id(key_id)
    return f"{key_id}.{secrets.token_urlsafe(32)}"


def key_id_of(secret: str) -> str | None:
    """The key id a presented secret names, or None if it is not shaped like one of ours."""
    key_id, dot, rest = secret.partition(".")
    if not dot or not rest or len(secret) > MAX_SECRET_CHARS or not _KEY_ID.fullmatch(key_id):
        return None
    return key_id


def check_key_id(key_id: str) -> str:
    """`key_id` if valid, else ValueError (without the value: a secret pasted in the wrong field must not be logged)."""
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ValueError("a key id must be 1-64 letters, digits, '_' or '-', starting with a letter or digit")
    return key_id


# --- the entries -----------------------------------------------------------------------------------------------

def normalise_root(root: str) -> str:
    """A cache root as the service spells it: no trailing '/', a local path absolute, file:// dropped."""
    root = str(root).rstrip("/")
    if root.startswith("file://"):
        return os.path.abspath(root[len("file://"):])
    if "://" in root:
        return root
    return os.path.abspath(os.path.expanduser(root))


@dataclass(frozen=True)
class Scope:
    """What one key may do under the service's root: read videos whose id starts with a prefix, and list them."""

    key_id: str
    prefixes: tuple[str, ...]  # video-id prefixes; "" is every video
    can_list: bool

    def allows(self, video_id: str) -> bool:
        return any(video_id.startswith(p) for p in self.prefixes)


@dataclass(frozen=True)
class KeyEntry:
    """One key of the file: its id, the hash of its secret, what it may read, and its own limits."""

    id: str
    hash: str
    roots: tuple[str, ...]  # cache roots it may read (normalised), or ("*",): any root of a service using the file
    prefixes: tuple[str, ...]  # video-id prefixes it may read; "" is every video
    list: bool = False  # may call GET /v1/videos (the listing shows only videos of its prefixes)
    limits: dict[str, float] = field(default_factory=dict)  # overrides of the service's per-key limits
    created: str | None = None
    note: str | None = None

    def scope_for(self, root: str) -> Scope | None:
        """The key's scope under the service root `root` (normalised), or None if it may not read that root."""
        if ANY_ROOT not in self.roots and root not in self.roots:
            return None
        return Scope(self.id, self.prefixes, self.list)

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "hash": self.hash, "roots": list(self.roots), "prefixes": list(self.prefixes),
               "list": self.list}
        if self.limits:
            out["limits"] = dict(self.limits)
        for name in ("created", "note"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a non-empty list of strings")
    return tuple(value)


def parse_entry(data: Any) -> KeyEntry:
    """A `KeyEntry` from one JSON object of the file; ValueError naming the field."""
    if not isinstance(data, dict):
        raise ValueError("each key must be a JSON object")
    key_id = check_key_id(data.get("id"))
    try:
        unknown = sorted(set(data) - _ENTRY_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {unknown}; known: {sorted(_ENTRY_FIELDS)}")
        if not isinstance(data.get("hash"), str):
            raise ValueError("hash: missing")
        try:
            check_hash_format(data["hash"])
        except ValueError as err:
            raise ValueError(f"hash: {err}") from None
        roots = _strings(data.get("roots"), "roots")
        roots = tuple(r if r == ANY_ROOT else normalise_root(r) for r in roots)
        prefixes = _strings(data.get("prefixes"), "prefixes ('' for every video)")
        if any("/" in p or ".." in p for p in prefixes):
            raise ValueError("prefixes are of video ids (one path segment): no '/' or '..'")
        can_list = data.get("list", False)
        if not isinstance(can_list, bool):
            raise ValueError("list must be true or false")
        limits = data.get("limits", {})
        if not isinstance(limits, dict) or sorted(set(limits) - set(LIMIT_FIELDS)):
            raise ValueError(f"limits must be an object with some of {list(LIMIT_FIELDS)}")
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"limits.{name} must be a number > 0")
        for name in ("created", "note"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string")
    except ValueError as err:
        raise ValueError(f"key {key_id!r}: {err}") from None
    return KeyEntry(key_id, data["hash"], roots, prefixes, can_list, dict(limits), data.get("created"),
                    data.get("note"))


def parse_key_file(text: str, path: str) -> dict[str, KeyEntry]:
    """{key id: entry} from a key file's text; KeyFileError (one line, naming `path`) when it is not valid."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise KeyFileError(path, f"not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(data, dict) or set(data) != {"keys"} or not isinstance(data["keys"], list):
        raise KeyFileError(path, 'must be a JSON object {"keys": [...]} and nothing else')
    entries: dict[str, KeyEntry] = {}
    for i, raw in enumerate(data["keys"]):
        try:
            entry = parse_entry(raw)
        except ValueError as err:
            raise KeyFileError(path, f"keys[{i}]: {err}") from None
        if entry.id in entries:
            raise KeyFileError(path, f"keys[{i}]: key id {entry.id!r} appears twice")
        entries[entry.id] = entry
    return entries


def load_key_file(path: str) -> dict[str, KeyEntry]:
    """The entries of the key file at `path`; KeyFileError if it is missing, unreadable or invalid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 24)
    except FileNotFoundError:
        raise KeyFileError(path, "not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise KeyFileError(path, f"cannot be read ({type(err).__name__}: {getattr(err, 'strerror', None) or err})"
                           ) from None
    return parse_key_file(text, path)


def _write(path: str, entries: list[KeyEntry]) -> None:
    """Replace the file at once (write beside it, then rename): a running service never reads half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"keys": [e.to_json() for e in entries]}, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def add_key(path: str, key_id: str, *, prefixes: list[str], roots: list[str] | None = None, can_list: bool = False,
            limits: dict[str, float] | None = None, note: str | None = None) -> str:
    """Append a new key to the file at `path` (made if missing) and return its secret, which is stored nowhere."""
    check_key_id(key_id)
    existing = load_key_file(path) if os.path.exists(path) else {}
    if key_id in existing:
        raise KeyFileError(path, f"key id {key_id!r} exists already; choose another id (rotation: add the new key, "
                                 "then revoke the old one)")
    secret = new_secret(key_id)
    raw = {"id": key_id, "hash": hash_secret(secret), "roots": roots or [ANY_ROOT], "prefixes": prefixes,
           "list": can_list, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if limits:
        raw["limits"] = limits
    if note:
        raw["note"] = note
    entry = parse_entry(raw)
    _write(path, [*existing.values(), entry])
    return secret


def remove_key(path: str, key_id: str) -> None:
    """Revoke `key_id`: rewrite the file without it (services drop it at their next check, within seconds)."""
    existing = load_key_file(path)
    if key_id not in existing:
        raise KeyFileError(path, f"no key {key_id!r}; ids: {', '.join(existing) or 'none'}")
    _write(path, [e for e in existing.values() if e.id != key_id])


# --- the file as a running service sees it ---------------------------------------------------------------------

def _stamp(path: str) -> tuple[Any, ...]:
    """What changes when the file is replaced or rewritten (a Kubernetes Secret update swaps a symlink: stat follows
    it to the new file)."""
    try:
        st = os.stat(path)
    except OSError as err:
        return ("unreadable", type(err).__name__)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class KeyStore:
    """The key file of a running service: read at start (a bad file stops the start), then re-read when its
    inode, size or mtime change, checked at most every `check_every_s` seconds, on the requests' path.

    A file that becomes unreadable or invalid keeps the last good set (an error in it must never open the service
    or lock everyone out) and logs one line per bad version. `generation` grows at each reload so that callers
    can drop what they derived from the old set (verified secrets).
    """

    def __init__(self, path: str, *, check_every_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.check_every_s = float(check_every_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = _stamp(path)
        self._keys = load_key_file(path)
        self._checked = clock()
        self._bad_stamp: tuple[Any, ...] | None = None
        self.generation = 0

    def current(self) -> tuple[int, dict[str, KeyEntry]]:
        """(generation, {key id: entry}) as of at most `check_every_s` ago."""
        if self._clock() - self._checked >= self.check_every_s and self._lock.acquire(blocking=False):
            try:  # one request checks; the others go on with the set they have
                self._checked = self._clock()
                self._reload_if_changed()
            finally:
                self._lock.release()
        return self.generation, self._keys

    def _reload_if_changed(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        try:
            keys = load_key_file(self.path)
        except KeyFileError as err:
            if stamp != self._bad_stamp:
                logger.error("%s; keeping the last good set of %d keys", err, len(self._keys))
                self._bad_stamp = stamp
            return
        self._keys, self._stamp, self._bad_stamp = keys, stamp, None
        self.generation += 1
        logger.info("key file %s reloaded: %d keys", self.path, len(keys))


__all__ = ["ANY_ROOT", "KEY_ID_PATTERN", "KeyEntry", "KeyFileError", "KeyStore", "Scope", "add_key", "check_key_id",
           "hash_secret", "key_id_of", "load_key_file", "new_secret", "normalise_root", "parse_key_file",
           "remove_key", "verify_secret"]
