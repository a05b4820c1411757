"""Who may ask the query service: checking a request's API key, the key's scope under the service's root, its
limits, and the rule that a service without keys is closed (loopback only) unless the operator opens it.

Plain classes, no HTTP framework: app.py reads the headers and the client address and calls `AccessControl`.

Checking a secret costs one slow hash (keys.py), too slow per request, so an `Authenticator` verifies each distinct
presented secret once and then keeps an HMAC of it (a per-process random key, so the map is useless outside this
process) mapped to the key id; the map is dropped whenever the key file is reloaded, so a revoked key stops working
at the next check of the file. Wrong secrets are remembered the same way, so repeating one costs nothing; at most
one slow hash runs at a time per replica, so a flood of made-up secrets takes one core at most.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from pipelines.serving.errors import Forbidden, Unauthorized
from pipelines.serving.keys import KeyEntry, KeyStore, Scope, hash_secret, key_id_of, verify_secret
from pipelines.serving.limits import Admission, KeyLimiter, Limits

logger = logging.getLogger(__name__)

VERIFIED_MAX = 4096  # distinct good secrets remembered per replica
REFUSED_MAX = 4096  # distinct wrong secrets remembered per replica


def is_loopback(host: str | None) -> bool:
    """Whether `host` (an address or 'localhost') is a loopback address; anything unparsable is not."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ExposureError(ValueError):
    """A non-loopback bind of a service that checks no keys, without the operator's explicit `--no-auth`."""


def check_bind(host: str, *, keys_configured: bool, no_auth: bool) -> None:
    """Refuse (ExposureError) to listen beyond loopback without API keys unless `no_auth` says so explicitly."""
    if keys_configured or no_auth or is_loopback(host):
        return
    raise ExposureError(f"refusing to listen on {host} without API keys: anyone who reaches the port could read every "
                        "video under the root. Give --api-keys FILE (see `statekv keys new`), listen on 127.0.0.1, "
                        "or pass --no-auth to serve everyone on purpose")


class Authenticator:
    """Maps an `Authorization` header to the key it proves, or raises Unauthorized (401)."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._mac_key = secrets.token_bytes(32)  # per process: the digests below mean nothing elsewhere
        self._lock = threading.Lock()  # the maps
        self._slow = threading.Lock()  # one slow hash at a time
        self._generation = -1
        self._verified: OrderedDict[bytes, str] = OrderedDict()  # digest -> key id
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        # checked for unknown key ids, so that they cost what a known id with a wrong secret costs
        self._dummy = hash_secret(secrets.token_urlsafe(16))
        self.slow_checks = 0

    def _digest(self, secret: str) -> bytes:
        return hmac.new(self._mac_key, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def _sync(self, generation: int) -> None:
        if generation != self._generation:
            self._verified.clear()
            self._refused.clear()
            self._generation = generation

    def authenticate(self, authorization: list[str]) -> KeyEntry:
        """The key proved by the request's Authorization header values (exactly one `Bearer <secret>`)."""
        if not authorization:
            raise Unauthorized("an API key is required: send `Authorization: Bearer <secret>`")
        if len(authorization) > 1:
            raise Unauthorized("send exactly one Authorization header", invalid=True)
        scheme, _, secret = authorization[0].strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("the Authorization header must be `Bearer <secret>`", invalid=True)
        entry = self._check(secret)
        if entry is None:
            raise Unauthorized("the API key is not valid (unknown, revoked or mistyped)", invalid=True)
        return entry

    def _check(self, secret: str) -> KeyEntry | None:
        key_id = key_id_of(secret)
        if key_id is None:  # not shaped like any secret we issue: refused without hashing
            return None
        digest = self._digest(secret)
        generation, entries = self.store.current()
        with self._lock:
            self._sync(generation)
            known = self._verified.get(digest)
            if known is not None:
                self._verified.move_to_end(digest)
                return entries.get(known)
            if digest in self._refused:
                return None
        with self._slow:
            with self._lock:  # another request may have checked the same secret meanwhile
                self._sync(generation)
                if digest in self._verified or digest in self._refused:
                    known = self._verified.get(digest)
                    return None if known is None else entries.get(known)
            entry = entries.get(key_id)
            if entry is None:
                verify_secret(secret, self._dummy)  # the same cost as a known id with a wrong secret
                good = False
            else:
                good = verify_secret(secret, entry.hash)
            self.slow_checks += 1
        with self._lock:
            if generation == self._generation:
                table = self._verified if good else self._refused
                table[digest] = key_id if good else None
                if len(table) > (VERIFIED_MAX if good else REFUSED_MAX):
                    table.popitem(last=False)
        return entry if good else None


@dataclass
class Caller:
    """Who a request comes from: a key (its scope and admission), or nobody (a service without keys)."""

    key_id: str | None
    scope: Scope | None  # None: every video under the root
    admission: Admission | None = None


class AccessControl:
    """The access rule of one replica: `keys` (a KeyStore) checks API keys, scopes and per-key limits; without
    keys the service answers loopback clients only, unless `no_auth` opens it to every client."""

    def __init__(self, root: str, *, keys: KeyStore | None = None, no_auth: bool = False,
                 defaults: Limits | None = None, limiter: KeyLimiter | None = None) -> None:
        if keys is not None and no_auth:
            raise ValueError("give API keys or no_auth, not both")
        self.root = root
        self.keys = keys
        self.no_auth = no_auth
        self.authenticator = Authenticator(keys) if keys is not None else None
        self.defaults = defaults or Limits()
        self.limiter = limiter or KeyLimiter()

    @property
    def mode(self) -> str:
        return "keys" if self.keys is not None else "open" if self.no_auth else "loopback"

    def authenticate(self, authorization: list[str], client_host: str | None) -> KeyEntry | None:
        """The request's key (401 without a valid one); without keys None, after the loopback rule (403 for another
        client unless `no_auth`). May run a slow hash: call it off the event loop."""
        if self.authenticator is None:
            if not self.no_auth and not is_loopback(client_host):
                raise Forbidden("this service has no API keys configured and answers loopback clients only",
                                code="loopback_only")
            return None
        return self.authenticator.authenticate(authorization)

    def authorize(self, entry: KeyEntry | None, *, listing: bool = False) -> Caller:
        """What `entry` may do here: 403 outside its roots or (listing) without list rights, 429 over its limits."""
        if entry is None:
            return Caller(None, None)
        scope = entry.scope_for(self.root)
        if scope is None:
            raise Forbidden(f"key {entry.id!r} may not read this service's cache root")
        if listing and not scope.can_list:
            raise Forbidden(f"key {entry.id!r} may not list videos; ask about a video by its id")
        limits = Limits(**{**vars(self.defaults), **entry.limits})
        return Caller(entry.id, scope, self.limiter.admit(entry.id, limits))
