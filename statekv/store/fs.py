"""URI -> (fsspec filesystem, path): local paths, file:// and s3:// (s3fs), with explicit S3 settings.

Only bytes move here; tensors are (de)serialised in `serde`. AWS credentials come from the usual environment
variables unless `StorageOptions` (or a plain dict of s3fs/fsspec options) says otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass
class StorageOptions:
    """Settings for an S3-compatible store (MinIO, moto, ...); unset fields fall back to the AWS env vars."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    region: str | None = None
    anon: bool = False

    def to_fsspec(self) -> dict[str, Any]:
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        opts: dict[str, Any] = {"client_kwargs": client} if client else {}
        for name in ("key", "secret", "token"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        if self.anon:
            opts["anon"] = True
        return opts


StorageOptionsLike = StorageOptions | dict[str, Any] | None


def fsspec_options(uri: str, storage_options: StorageOptionsLike) -> dict[str, Any]:
    """Options for `fsspec.url_to_fs`: a dict is taken as is; `endpoint_url`/`region` are moved where s3fs wants them."""
    if storage_options is None:
        opts: dict[str, Any] = {}
    elif isinstance(storage_options, StorageOptions):
        opts = storage_options.to_fsspec()
    else:
        opts = dict(storage_options)
        client = dict(opts.pop("client_kwargs", {}) or {})
        if "endpoint_url" in opts:
            client["endpoint_url"] = opts.pop("endpoint_url")
        if "region" in opts:
            client["region_name"] = opts.pop("region")
        if client:
            opts["client_kwargs"] = client
    if uri.startswith(("s3://", "s3a://")):
        # listings must see other writers' commits: no instance reuse across calls with stale directory caches
        opts.setdefault("skip_instance_cache", True)
        opts.setdefault("use_listings_cache", False)
    return opts


def resolve(uri: str | os.PathLike, storage_options: StorageOptionsLike = None,
            filesystem: fsspec.AbstractFileSystem | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for `uri`; `filesystem` overrides the one the URI would give."""
    uri = os.fspath(uri)
    if filesystem is not None:
        return filesystem, filesystem._strip_protocol(uri).rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri, **fsspec_options(uri, storage_options))
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(getattr(fs, "fs", fs), LocalFileSystem) or isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so readers see the old object or the new one, never a partial one."""
    if is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # rename is atomic on one POSIX filesystem
    else:
        fs.pipe_file(path, data)  # an S3 PUT is atomic: the key has the old or the new object


class NotRegularFileError(ValueError):
    """A local cache part that is not a regular file inside its cache folder (a symlink, FIFO, device or
    directory): never opened, since reading it could block forever, never end, or read another folder's data."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        super().__init__(f"{path} is {what}, not a regular file inside the cache folder")


class BoundedFile(io.RawIOBase):
    """A read-only file object that shows exactly the first `size` bytes of `f` (the size a manifest declares):
    reads stop there and seeking from the end counts from there, so a store that grew, or a file that never ends,
    cannot make a reader read more."""

    def __init__(self, f: Any, size: int) -> None:
        super().__init__()
        self._f, self._size, self._pos = f, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        self._f.seek(self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_part(fs: fsspec.AbstractFileSystem, folder: str, rel: str, size: int) -> BoundedFile:
    """A file object on `folder/rel` (a cache part) showing at most its declared `size` bytes.

    Local folders: checked first by `local_part_size` (a regular file, no link inside the cache folder), so a
    FIFO, a device or a link out of the cache folder is never opened. Elsewhere (S3: no links, no special files)
    the reads are bounded by `size` all the same. FileNotFoundError if absent."""
    if is_local(fs):
        local_part_size(fs, folder, rel)
    return BoundedFile(fs.open(join(folder, rel), "rb", cache_type="none"), size)


def read_part(fs: fsspec.AbstractFileSystem, folder: str, rel: str, size: int) -> bytes:
    """The first `size` bytes of `folder/rel` at most, in one request (see `open_part` for local folders)."""
    if is_local(fs):
        local_part_size(fs, folder, rel)
    return fs.cat_file(join(folder, rel), start=0, end=size)


def local_part_size(fs: fsspec.AbstractFileSystem, folder: str, rel: str) -> int:
    """Size of the local cache part `folder/rel`; NotRegularFileError unless it is a regular file reached from
    `folder` without following a link (the folder itself may be reached through links).

    The bytes are then read through `fs` (so wrappers that meter reads see them): a part replaced by a FIFO in
    the instant between this check and that open is the one case left, and it needs a writer racing the reader."""
    with _open_regular(_local_path(fs, folder), rel) as f:
        return os.fstat(f.fileno()).st_size


def _open_regular(folder: str, rel: str) -> Any:
    """`folder/rel` opened for reading, each component of `rel` without following links; a regular file only."""
    names = rel.split("/")
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for i, name in enumerate(names):
            last = i == len(names) - 1
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
            flags = os.O_RDONLY | nofollow | getattr(os, "O_CLOEXEC", 0) | (
                getattr(os, "O_NONBLOCK", 0) if last else getattr(os, "O_DIRECTORY", 0))
            try:
                nxt = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
                    raise
                # O_NOFOLLOW met a link (ELOOP; ENOTDIR with O_DIRECTORY), or a file stands where a folder should
                where = f"{folder}/{'/'.join(names[:i + 1])}"
                link = e.errno != errno.ENOTDIR or stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode)
                raise NotRegularFileError(where, "a symbolic link" if link else "not a folder") from None
            os.close(fd)
            fd = nxt
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a folder" if stat.S_ISDIR(mode) else "a special file"
            raise NotRegularFileError(f"{folder}/{rel}", what)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f


def _s3(fs: fsspec.AbstractFileSystem) -> Any:
    """The s3fs filesystem behind `fs` (possibly a wrapper with `.fs`), or None."""
    try:
        from s3fs import S3FileSystem
    except ImportError:  # no S3 support installed
        return None
    inner = getattr(fs, "fs", fs)
    return inner if isinstance(inner, S3FileSystem) else None


def _local_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return getattr(fs, "fs", fs)._strip_protocol(path)


class ObjectTooLargeError(ValueError):
    """An object larger than a reader accepts (a manifest is small: a huge one is not a manifest)."""

    def __init__(self, path: str, limit: int) -> None:
        self.path, self.limit = path, limit
        super().__init__(f"{path} is larger than {limit} bytes")


def read_versioned(fs: fsspec.AbstractFileSystem, path: str, *, limit: int | None = None) -> tuple[bytes, str]:
    """(bytes, version) of one object; the version identifies exactly those bytes (S3: the ETag of that GET;
    elsewhere the MD5 of the bytes, which is what S3 gives for a single-part PUT too). FileNotFoundError if absent.
    With `limit`: ObjectTooLargeError beyond it, and a local object must be a regular file (NotRegularFileError)."""
    s3 = _s3(fs)
    if s3 is None:
        if limit is not None and is_local(fs):
            folder, name = _local_path(fs, path).rsplit("/", 1)
            _open_regular(folder, name).close()  # a regular file, not a link, FIFO or device
        data = fs.cat_file(path) if limit is None else fs.cat_file(path, start=0, end=limit + 1)
        if limit is not None and len(data) > limit:
            raise ObjectTooLargeError(path, limit)
        return data, hashlib.md5(data).hexdigest()
    bucket, key, _ = s3.split_path(path)

    async def get() -> tuple[bytes, str]:
        resp = await s3._call_s3("get_object", Bucket=bucket, Key=key)
        body = resp["Body"]
        try:
            if limit is not None and int(resp.get("ContentLength") or 0) > limit:
                raise ObjectTooLargeError(path, limit)
            data = await body.read()
        finally:
            body.close()
        return data, resp["ETag"].strip('"')

    return fsspec.asyn.sync(s3.loop, get)


def object_version(fs: fsspec.AbstractFileSystem, path: str, *, limit: int | None = None) -> str:
    """The current version of one object, as `read_versioned` gives it, at the cost of one HEAD on S3."""
    s3 = _s3(fs)
    if s3 is None:
        return read_versioned(fs, path, limit=limit)[1]  # a local manifest is small: reading it is as cheap as a stat
    return str(s3.info(path, refresh=True)["ETag"]).strip('"')


def put_if_version(fs: fsspec.AbstractFileSystem, path: str, data: bytes, expect: str | None) -> str | None:
    """Write `data` at `path` only if the object there is still version `expect` (None: only if absent).

    Returns the new version, or None when the condition failed (another writer got there first). Local: under
    an exclusive lock on `<dir>/.lock` (every statekv writer takes it), compare then atomic rename. S3: a
    conditional PUT (If-None-Match: * to create, If-Match: <etag> to replace). Other filesystems: an
    unconditional atomic write (no single-winner guarantee).
    """
    s3 = _s3(fs)
    if s3 is not None:
        return _s3_put_if(s3, path, data, expect)
    if not is_local(fs):
        put_atomic(fs, path, data)
        return hashlib.md5(data).hexdigest()
    import fcntl

    local = _local_path(fs, path)
    folder = os.path.dirname(local)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_NAME), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        try:
            with open(local, "rb") as f:
                current: str | None = hashlib.md5(f.read()).hexdigest()
        except FileNotFoundError:
            current = None
        if current != expect:
            return None
        put_atomic(fs, path, data)
    return hashlib.md5(data).hexdigest()


LOCK_NAME = ".lock"  # local writers' commit lock inside a cache folder


def _s3_put_if(s3: Any, path: str, data: bytes, expect: str | None) -> str | None:
    from botocore.exceptions import ClientError

    bucket, key, _ = s3.split_path(path)
    cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": f'"{expect}"'}

    async def put() -> str | None:
        client = await s3.set_session()
        try:
            resp = await client.put_object(Bucket=bucket, Key=key, Body=data, **cond)
        except ClientError as e:
            # 412: the condition failed; 409: a concurrent conditional write to the same key is in flight
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise
        return resp["ETag"].strip('"')

    try:
        return fsspec.asyn.sync(s3.loop, put)
    finally:
        s3.invalidate_cache(path)


def transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the bytes did not arrive (network, timeouts), as opposed to wrong bytes."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore import exceptions as boto

        types += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(types)


TRANSPORT_ERRORS = transport_errors()


def credential_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean this process has no usable credentials or region for the store (its environment,
    not the store or the bytes, is at fault): botocore's, when it is installed."""
    try:
        from botocore import exceptions as boto
    except ImportError:
        return ()
    return (boto.NoCredentialsError, boto.PartialCredentialsError, boto.CredentialRetrievalError,
            boto.NoRegionError)


CREDENTIAL_ERRORS = credential_errors()


def is_transport_error(exc: BaseException) -> bool:
    """True for a failure to deliver bytes: a network error, or an I/O error that is not 'missing'/'denied'."""
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    return isinstance(exc, TRANSPORT_ERRORS) or type(exc) is OSError or isinstance(exc, (BlockingIOError,
                                                                                         InterruptedError))
