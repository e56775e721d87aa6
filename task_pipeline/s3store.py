"""Objects in an S3 bucket: `--objects s3://bucket/prefix`, keys `prefix/objects/ab/cd/<rest>`.

The same interface and promises as the directory store (store.ObjectStore), through
obstore (Rust's object_store: streaming, multipart, create-only puts, retries):

- An output is hashed once as it is read from local scratch, then uploaded. An object
  up to SMALL bytes goes in one create-only PUT (If-None-Match), so two hosts storing the
  same bytes at once never conflict and nothing is overwritten. A bigger one streams in
  parts from the file (memory stays flat); a multipart upload cannot be made create-only
  here, so two hosts racing to store the same big object both write it, identical bytes.
- The database refers to an object only after its upload has succeeded (the engine
  commits after the executor returns). A failed upload is `StoreUnavailable`: the attempt
  goes back to the queue, nothing is committed, and a `run` stops with one line.
- Inputs are downloaded into scratch and hashed on the way; a mismatch fails the task,
  naming the object. An optional cache on each host (`--cache-size`) keeps downloaded
  objects, verified again on every use, evicting the least recently used.
- A bucket cannot touch an object the way a directory store does when a new output turns
  out to be identical to it (which is how gc learns it is in use again). Instead an object
  older than REFRESH_AFTER is uploaded again when an output matches it, and gc on a bucket
  keeps every unreferenced object younger than GC_GRACE.

Credentials come from the usual AWS environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION) or the shared credentials file
(AWS_SHARED_CREDENTIALS_FILE, default ~/.aws/credentials, profile AWS_PROFILE); the
endpoint of a non-AWS server from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import configparser
import os
import time
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import urlsplit

from task_pipeline import fsutil
from task_pipeline.errors import StoreError, UsageError
from task_pipeline.store import (CHUNK, Cancelled, ObjectEntry, ObjectError, StoreUnavailable, _write_all, hash_fd,
                                 new_hasher)

SMALL = 8 << 20          # bytes: up to this, one create-only PUT; above, a streamed multipart upload
PART = 8 << 20           # multipart part size
PARTS_AT_ONCE = 4        # parts uploaded concurrently (memory: PART x PARTS_AT_ONCE)
REFRESH_AFTER = 1800.0   # seconds: an existing object older than this is uploaded again when an output matches it
GC_GRACE = 3600.0        # seconds: gc on a bucket keeps unreferenced objects younger than this


def _import():
    try:
        import obstore
        from obstore.store import S3Store as _S3
    except ImportError:
        raise UsageError("objects in S3 need the S3 extra: pip install 'task-pipeline[s3]'") from None
    return obstore, _S3


def _credentials_file() -> dict[str, str]:
    """Keys from the shared AWS credentials file, for the profile in AWS_PROFILE (default 'default')."""
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    parser = configparser.ConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError:
        return {}
    except configparser.Error as e:
        raise StoreError(f"{path}: not a readable AWS credentials file ({str(e).splitlines()[0]})") from None
    profile = os.environ.get("AWS_PROFILE") or "default"
    if not parser.has_section(profile):
        return {}
    sec = parser[profile]
    out = {}
    for ours, theirs in (("access_key_id", "aws_access_key_id"), ("secret_access_key", "aws_secret_access_key"),
                         ("token", "aws_session_token")):
        if sec.get(theirs):
            out[ours] = sec[theirs]
    return out


class S3Store:
    local = False

    def __init__(self, url: str, algo: str, cache_dir: Path | None = None, cache_bytes: int = 0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise UsageError(f"--objects {url}: an S3 location is s3://BUCKET or s3://BUCKET/PREFIX")
        self.url = url.rstrip("/")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.algo = algo
        self.obstore, s3 = _import()
        config: dict[str, str] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            config["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            config["region"] = region
        env_keys = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
                    "token": "AWS_SESSION_TOKEN"}
        if not os.environ.get("AWS_ACCESS_KEY_ID"):
            config.update(_credentials_file())
        else:
            config.update({k: os.environ[v] for k, v in env_keys.items() if os.environ.get(v)})
        client = {"allow_http": bool(endpoint and endpoint.startswith("http://")),
                  "connect_timeout": "10s", "timeout": "300s"}
        try:
            from datetime import timedelta

            self.s3 = s3(self.bucket, prefix=self.prefix or None, config=config, client_options=client,
                         retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=30),
                                       "backoff": {"init_backoff": timedelta(milliseconds=100),
                                                   "max_backoff": timedelta(seconds=5), "base": 2}})
        except Exception as e:  # noqa: BLE001 - obstore's configuration errors are plain exceptions
            raise UsageError(f"--objects {url}: {_first_line(e)}") from None
        self.cache = _Cache(cache_dir, cache_bytes) if cache_dir is not None and cache_bytes > 0 else None

    # -- naming ----------------------------------------------------------------

    def describe(self) -> str:
        return self.url

    def key(self, h: str) -> str:
        return f"objects/{h[:2]}/{h[2:4]}/{h[4:]}"

    def path_str(self, h: str) -> str:
        return f"{self.url}/{self.key(h)}"

    def name_of(self, where: str) -> str | None:
        head = f"{self.url}/objects/"
        if where.startswith(head):
            return where[len(head):].replace("/", "")
        return None

    def create_dirs(self) -> None:
        self.check()

    def check(self) -> None:
        """The bucket answers, and lets us in: one clear line otherwise, before any work starts."""
        try:
            next(iter(self.obstore.list(self.s3, prefix="objects/", chunk_size=1)), None)
        except Exception as e:  # noqa: BLE001
            raise self._trouble(e, "reach") from None

    def _trouble(self, e: BaseException, doing: str) -> StoreError:
        text = _first_line(e)
        if isinstance(e, getattr(self.obstore.exceptions, "PermissionDeniedError", ())) or \
                isinstance(e, getattr(self.obstore.exceptions, "UnauthenticatedError", ())):
            return StoreError(f"{self.url}: the bucket refused us ({text}); check the credentials "
                              f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the credentials file)")
        return StoreUnavailable(f"cannot {doing} the bucket {self.url}: {text}; check --objects, the endpoint "
                                f"(AWS_ENDPOINT_URL) and the network")

    # -- writing ----------------------------------------------------------------

    def has(self, h: str) -> bool:
        try:
            self.obstore.head(self.s3, self.key(h))
        except FileNotFoundError:
            return False
        except Exception as e:  # noqa: BLE001
            raise self._trouble(e, "reach") from None
        return True

    def _age(self, h: str) -> float | None:
        """Seconds since object `h` was written, or None if there is no such object."""
        try:
            meta = self.obstore.head(self.s3, self.key(h))
        except FileNotFoundError:
            return None
        return time.time() - meta["last_modified"].timestamp()

    def _put_fd(self, fd: int, size: int, digest: str) -> None:
        key = self.key(digest)
        try:
            age = self._age(digest)
            if age is not None and age < REFRESH_AFTER:
                return  # stored already, and young enough that no gc takes it before we commit
            if size <= SMALL:
                data = os.pread(fd, size + 1, 0) if size else b""
                mode = "overwrite" if age is not None else "create"   # refresh an old one: same bytes
                try:
                    self.obstore.put(self.s3, key, data, mode=mode)
                except self.obstore.exceptions.AlreadyExistsError:
                    pass  # another host stored the same bytes first
                return
            # /proc/self/fd/N: obstore reads the very file we hashed, in parts, from its own threads
            self.obstore.put(self.s3, key, Path(f"/proc/self/fd/{fd}"), use_multipart=True, chunk_size=PART,
                             max_concurrency=PARTS_AT_ONCE)
        except (Cancelled, StoreError):
            raise
        except Exception as e:  # noqa: BLE001 - the network, the server: not the script's fault
            raise self._trouble(e, "upload to") from None

    def ingest_output(self, dir_fd: int, name: str, fd: int, st: os.stat_result, *,
                      cancel: Callable[[], bool] | None = None, settled: bool = False) -> tuple[str, int]:
        digest, size = hash_fd(fd, self.algo, st.st_size, cancel)
        self._put_fd(fd, size, digest)
        return digest, size

    def ingest_log(self, fd: int, size: int) -> tuple[str, int]:
        os.lseek(fd, 0, os.SEEK_SET)
        digest, size = hash_fd(fd, self.algo, size)
        self._put_fd(fd, size, digest)
        return digest, size

    def ingest_path(self, src: Path | str) -> tuple[str, int]:
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"{src}: cannot read: {e.strerror}") from None
        try:
            import stat

            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{src}: not a regular file")
            digest, size = hash_fd(fd, self.algo, st.st_size)
            self._put_fd(fd, size, digest)
            return digest, size
        finally:
            os.close(fd)

    def ingest_stream(self, f: BinaryIO) -> tuple[str, int]:
        """Standard input: kept in an unnamed temporary file while it is hashed, then uploaded."""
        import tempfile

        with tempfile.TemporaryFile() as tmp:
            while data := f.read(CHUNK):
                tmp.write(data)
            tmp.flush()
            fd = tmp.fileno()
            size = os.fstat(fd).st_size
            os.lseek(fd, 0, os.SEEK_SET)
            digest, size = hash_fd(fd, self.algo, size)
            self._put_fd(fd, size, digest)
            return digest, size

    def ingest_bytes(self, data: bytes) -> tuple[str, int]:
        h = new_hasher(self.algo, len(data))
        h.update(data)
        digest = h.hexdigest()
        try:
            if self._age(digest) is None or self._age(digest) >= REFRESH_AFTER:
                try:
                    self.obstore.put(self.s3, self.key(digest), data, mode="create")
                except self.obstore.exceptions.AlreadyExistsError:
                    pass
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._trouble(e, "upload to") from None
        return digest, len(data)

    @cached_property
    def empty(self) -> tuple[str, int]:
        return self.ingest_bytes(b"")

    def sync(self) -> None:
        pass  # an upload is durable when it returns

    # -- reading ----------------------------------------------------------------

    def _chunks(self, h: str) -> Iterator[bytes]:
        try:
            result = self.obstore.get(self.s3, self.key(h))
            for chunk in result.stream(min_chunk_size=CHUNK):
                yield memoryview(chunk)  # the library's buffer itself: a copy per chunk cost a tenth of a GB/s
        except FileNotFoundError:
            raise ObjectError(f"object {h} is missing from {self.url}; run 'task-pipeline fsck' to see what used it",
                              h) from None
        except (ObjectError, StoreError):
            raise
        except Exception as e:  # noqa: BLE001
            raise self._trouble(e, "download from") from None

    def copy_to_fd(self, h: str, out: int) -> int:
        if self.cache is not None:
            n = self.cache.copy_to_fd(h, out, self.algo)
            if n is not None:
                return n
            os.lseek(out, 0, os.SEEK_SET)
            os.ftruncate(out, 0)
        hasher = new_hasher(self.algo)
        keep = self.cache.begin(h) if self.cache is not None else None
        n = 0
        try:
            for data in self._chunks(h):
                hasher.update(data)
                _write_all(out, data)
                if keep is not None:
                    _write_all(keep[1], data)
                n += len(data)
            actual = hasher.hexdigest()
            if actual != h:
                raise ObjectError(f"object {h} is damaged: its bytes hash to {actual[:16]}...; run 'task-pipeline "
                                  f"fsck'", h)
        except BaseException:
            if keep is not None:
                self.cache.abandon(keep)
            raise
        if keep is not None:
            self.cache.finish(keep, h, n)
        return n

    def stream(self, h: str, out: BinaryIO) -> None:
        hasher = new_hasher(self.algo)
        for data in self._chunks(h):
            hasher.update(data)
            out.write(data)
        actual = hasher.hexdigest()
        if actual != h:
            out.flush()
            raise ObjectError(f"object {h} is damaged: its bytes hash to {actual[:16]}...; run 'task-pipeline fsck'", h)

    def read_tail(self, h: str, limit: int) -> tuple[bytes, int]:
        try:
            size = self.obstore.head(self.s3, self.key(h))["size"]
            if size == 0:
                return b"", 0
            data = self.obstore.get_range(self.s3, self.key(h), start=max(size - limit, 0), end=size)
            return bytes(data), size
        except FileNotFoundError:
            raise ObjectError(f"object {h} is missing from {self.url}", h) from None
        except Exception as e:  # noqa: BLE001
            raise self._trouble(e, "download from") from None

    def rehash(self, h: str) -> str | None:
        hasher = new_hasher(self.algo)
        try:
            for data in self._chunks(h):
                hasher.update(data)
        except ObjectError:
            return None
        return hasher.hexdigest()

    # -- housekeeping ------------------------------------------------------------

    def scan(self) -> Iterator[ObjectEntry]:
        try:
            for batch in self.obstore.list(self.s3, prefix="objects/", chunk_size=1000):
                for meta in batch:
                    path = meta["path"]
                    rest = path[len("objects/"):] if path.startswith("objects/") else path
                    yield ObjectEntry(rest.replace("/", ""), f"{self.url}/{path}", meta["size"],
                                      meta["last_modified"].timestamp(), True)
        except Exception as e:  # noqa: BLE001
            raise self._trouble(e, "list") from None

    def remove(self, h: str, changed_before: float) -> bool:
        age = self._age(h)
        if age is None or time.time() - age >= changed_before:
            return False  # gone, or written again meanwhile (a runner refreshed it)
        try:
            self.obstore.delete(self.s3, self.key(h))
        except FileNotFoundError:
            return False
        except Exception as e:  # noqa: BLE001
            raise self._trouble(e, "delete from") from None
        return True

    def tidy(self, older_than: float, dry_run: bool = False, prune: bool = True) -> tuple[int, int]:
        # no directories to prune; an upload abandoned half-way is the bucket's to expire (a lifecycle rule)
        return 0, 0


class _Cache:
    """Objects downloaded on this host, up to `limit` bytes, the least recently used evicted first.
    Entries are verified every time they are used, like a download."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = Path(root), limit
        fsutil.make_dirs(str(self.root), 0o700)
        self.used = sum(e.stat().st_size for e in os.scandir(self.root) if e.is_file(follow_symlinks=False))

    def copy_to_fd(self, h: str, out: int, algo: str) -> int | None:
        path = self.root / h
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            hasher, n = new_hasher(algo), 0
            while data := os.read(fd, CHUNK):
                hasher.update(data)
                _write_all(out, data)
                n += len(data)
        finally:
            os.close(fd)
        if hasher.hexdigest() != h:
            self._drop(path)
            return None
        os.utime(path)  # recently used
        return n

    def begin(self, h: str) -> tuple[str, int]:
        tmp = str(self.root / f".{h}.{os.getpid()}.{os.urandom(3).hex()}")
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def abandon(self, keep: tuple[str, int]) -> None:
        os.close(keep[1])
        try:
            os.unlink(keep[0])
        except OSError:
            pass

    def finish(self, keep: tuple[str, int], h: str, size: int) -> None:
        os.close(keep[1])
        if size > self.limit:
            os.unlink(keep[0])
            return
        os.rename(keep[0], self.root / h)
        self.used += size
        if self.used > self.limit:
            self._evict()

    def _drop(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
            self.used -= size
        except OSError:
            pass

    def _evict(self) -> None:
        entries = sorted((e.stat().st_mtime, e.path, e.stat().st_size) for e in os.scandir(self.root)
                         if e.is_file(follow_symlinks=False) and not e.name.startswith("."))
        for _, path, size in entries:
            if self.used <= self.limit * 0.9:
                break
            try:
                os.unlink(path)
                self.used -= size
            except OSError:
                pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
