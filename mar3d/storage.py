"""Where mar3d reads and writes: local paths or ``s3://bucket/prefix`` URIs.

Every location a job touches (dataset input, shards, training ``storage_path``,
evaluation and generation outputs) goes through this module, which keeps local paths
exactly as they were (plain :mod:`pathlib` / ``os`` calls) and maps ``s3://`` URIs to
:class:`pyarrow.fs.S3FileSystem` -- the same filesystem Ray Data and Ray Train use, so
there is one S3 client configuration for the whole system.

Configuration is the standard AWS environment, nothing mar3d-specific:

* ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` -- an S3-compatible endpoint (MinIO,
  Ceph, a local moto server), e.g. ``http://127.0.0.1:9000``; unset = AWS itself;
* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), or a profile,
  web identity (IRSA) or container credentials;
* ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

MLflow's S3 artifact store (boto3) reads its endpoint from ``MLFLOW_S3_ENDPOINT_URL``;
:func:`configure_mlflow_s3` copies the AWS endpoint there when it is unset, so users set
one variable, not two.

:func:`check` is the preflight every entry point calls before starting Ray or any work:
unsupported schemes, ``s3://`` without a bucket, missing credentials and buckets that do
not exist or cannot be reached are a :class:`StorageError` naming the location and what
to set, not a stack trace from the middle of a job.

Writes are atomic per file: a local file is written to a temporary ``NAME.<pid>.tmp<suffix>``
beside it (:func:`atomic_local_path`, the one place that does this), fsynced and renamed;
an S3 object becomes visible only when its upload completes (single PUT or
completed multipart upload), so a reader never sees half a file either way.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlparse

from mar3d.uris import refuse_credentials

REMOTE_SCHEMES = ("s3",)
_CREDENTIAL_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, a shared "
                    "credentials file, AWS_WEB_IDENTITY_TOKEN_FILE, or AWS_EC2_METADATA_DISABLED=false "
                    "to use the instance profile)")


class StorageError(ValueError):
    """A location that cannot be used: bad URI, missing credentials, missing bucket."""


# ------------------------------------------------------------------------------ URIs
def is_remote(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations (anything that is not a local path)."""
    return "://" in str(location)


def _split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://`` URI; the key has no leading or trailing slash."""
    refuse_credentials(uri, "storage location", "give the keys as AWS_ACCESS_KEY_ID / "
                       "AWS_SECRET_ACCESS_KEY (or an AWS profile) instead", StorageError)
    parsed = urlparse(uri)
    if parsed.scheme not in REMOTE_SCHEMES:
        raise StorageError(f"unsupported storage scheme {parsed.scheme!r} in {uri!r}: use a local path "
                           f"or {' / '.join(s + '://bucket/prefix' for s in REMOTE_SCHEMES)}")
    if not parsed.netloc:
        raise StorageError(f"{uri!r} names no bucket: expected s3://BUCKET/prefix")
    if parsed.query or parsed.fragment:
        raise StorageError(f"{uri!r}: query strings are not supported; configure the endpoint with "
                           "AWS_ENDPOINT_URL instead")
    return parsed.netloc, parsed.path.strip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (URIs always use ``/``)."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base, *parts))


def name(location: str | os.PathLike) -> str:
    """The last path component (``s3://b/x/y`` -> ``y``)."""
    return PurePosixPath(str(location).rstrip("/")).name if is_remote(location) else Path(location).name


def parent(location: str | os.PathLike) -> str:
    if is_remote(location):
        bucket, key = _split_s3(str(location))
        head = str(PurePosixPath(key).parent) if "/" in key else ""
        return f"s3://{bucket}/{head}".rstrip("/")
    return str(Path(location).parent)


def display(location: str | os.PathLike) -> str:
    """The location as users gave it: URIs unchanged, local paths absolute."""
    return str(location) if is_remote(location) else str(Path(location).absolute())


# ------------------------------------------------------------------------ filesystem
def aws_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def configure_mlflow_s3() -> None:
    """Point MLflow's boto3 artifact client at the same endpoint as everything else."""
    endpoint = aws_endpoint()
    if endpoint and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
            "AWS_CA_BUNDLE", "AWS_EC2_METADATA_DISABLED", "MLFLOW_S3_ENDPOINT_URL")


def aws_env() -> dict[str, str]:
    """The S3 settings of this process, for Ray tasks and workers that read or write S3.

    Ray workers inherit the environment of the process that started Ray, which need not
    be the one that names an ``s3://`` location (a long-lived local Ray, a cluster whose
    pods lack the variables), so jobs pass these in their runtime_env. They then travel
    with the job's metadata: on a shared cluster prefer pod-level credentials (IRSA,
    a mounted secret) and leave the key variables unset in the submitting process."""
    configure_mlflow_s3()
    return {k: os.environ[k] for k in _AWS_ENV if os.environ.get(k)}


def ray_task_options(*locations) -> dict:
    """Ray task/actor options giving the S3 settings to tasks that touch any remote
    location among ``locations`` (nothing for local ones)."""
    env = aws_env() if any(loc and is_remote(loc) for loc in locations) else {}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _has_credentials() -> bool:
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if env.get("AWS_PROFILE") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return True
    if env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        return True
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "false":
        return True  # an explicit opt-in to instance-profile credentials
    shared = Path(env.get("AWS_SHARED_CREDENTIALS_FILE", Path.home() / ".aws" / "credentials"))
    return shared.is_file()


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, keys: tuple[str, str, str | None] | None):
    from pyarrow import fs

    kwargs = {}
    if keys is not None:
        # Explicit keys travel with the filesystem object when Ray ships it to its train
        # controller and workers, whose environment may lack them (a long-lived Ray).
        kwargs.update(access_key=keys[0], secret_key=keys[1], session_token=keys[2])
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # S3-compatible servers ignore it; the SDK needs one
    # Without retries a transient error would fail a shard; the SDK default is 3 attempts.
    kwargs["retry_strategy"] = fs.AwsStandardS3RetryStrategy(max_attempts=5)
    return fs.S3FileSystem(**kwargs)


def filesystem(location: str | os.PathLike):
    """(pyarrow filesystem, path on it) for a local path or an ``s3://`` URI."""
    from pyarrow import fs

    if not is_remote(location):
        return fs.LocalFileSystem(), str(Path(location).absolute())
    bucket, key = _split_s3(str(location))
    env = os.environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    keys = ((env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN"))
            if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY") else None)
    return _s3(aws_endpoint(), region, keys), f"{bucket}/{key}".rstrip("/")


# --------------------------------------------------------------------------- preflight
def check(location: str | os.PathLike, what: str = "location", must_exist: bool = False) -> str:
    """Preflight of one location, before any job starts; returns it as given.

    Local paths: only ``must_exist`` is checked (outputs are created by the job), with a
    FileNotFoundError as before object storage existed. URIs:
    scheme, bucket name, credentials in the environment, and the bucket answering --
    plus, with ``must_exist``, something at the key (an object or a prefix)."""
    location = str(location)
    if not location:
        raise StorageError(f"the {what} is empty")
    if not is_remote(location):
        if must_exist and not Path(location).exists():
            # The error local paths have always raised (callers and tests catch it).
            raise FileNotFoundError(f"the {what} {location} does not exist")
        return location
    bucket, _ = _split_s3(location)
    if not _has_credentials():
        raise StorageError(f"no S3 credentials for the {what} {location}: {_CREDENTIAL_HINT}")
    from pyarrow import fs as pafs

    s3, path = filesystem(location)
    endpoint = aws_endpoint() or "AWS S3"
    try:
        bucket_info = s3.get_file_info(bucket)
    except OSError as e:
        raise StorageError(f"cannot reach bucket {bucket!r} of the {what} {location} at {endpoint}: "
                           f"{str(e).splitlines()[0][:300]} (check AWS_ENDPOINT_URL and the "
                           "credentials)") from e
    if bucket_info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket {bucket!r} of the {what} {location} does not exist at {endpoint}")
    if must_exist and path != bucket and s3.get_file_info(path).type == pafs.FileType.NotFound:
        raise StorageError(f"the {what} {location} does not exist (no object or prefix at that key)")
    return location


def check_all(locations: dict[str, str | os.PathLike | None], must_exist: tuple[str, ...] = ()) -> None:
    """:func:`check` for every named location that is set (``{what: location}``)."""
    for what, location in locations.items():
        if location:
            check(location, what, must_exist=what in must_exist)


# ------------------------------------------------------------------------- file access
def exists(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    from pyarrow import fs as pafs

    s3, path = filesystem(location)
    return s3.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(location).is_file()
    from pyarrow import fs as pafs

    s3, path = filesystem(location)
    return s3.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A local folder, or an S3 prefix holding at least one object (or the bucket)."""
    if not is_remote(location):
        return Path(location).is_dir()
    from pyarrow import fs as pafs

    s3, path = filesystem(location)
    return s3.get_file_info(path).type == pafs.FileType.Directory


def size(location: str | os.PathLike) -> int | None:
    """Bytes of a file, None when there is no file there."""
    if not is_remote(location):
        p = Path(location)
        return p.stat().st_size if p.is_file() else None
    from pyarrow import fs as pafs

    s3, path = filesystem(location)
    info = s3.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    s3, path = filesystem(location)
    with s3.open_input_stream(path) as f:
        return f.read()


def open_input(location: str | os.PathLike):
    """A seekable binary file (what :class:`pyarrow.parquet.ParquetFile` reads ranges of)."""
    if not is_remote(location):
        return open(location, "rb")
    s3, path = filesystem(location)
    return s3.open_input_file(path)


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 160


def safe_name(raw: str) -> str:
    """A file-name-safe name for ``raw`` (an item id, an object uid): path parts joined by
    ``__``, unsafe characters replaced, never hidden, long names shortened with a hash so
    they stay distinct; raises ValueError for empty or '.'/'..' path parts (traversal)."""
    parts = str(raw).replace("\\", "/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"id {raw!r} is empty, absolute or has '.'/'..' path parts")
    out = "__".join(_UNSAFE_NAME_CHARS.sub("_", p) for p in parts)
    if out.startswith("."):  # no hidden mesh files
        out = "_" + out[1:]
    if len(out) > _MAX_NAME:  # keep file names short; the hash keeps long ids distinct
        out = out[:_MAX_NAME - 17] + "-" + hashlib.sha256(str(raw).encode()).hexdigest()[:16]
    return out


TEMPORARY_MARKER = ".tmp"


@contextlib.contextmanager
def atomic_local_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write a local file atomically: the block writes to the temporary path it is given
    (beside ``path``, same suffix, so writers that pick a format by suffix still work);
    when the block succeeds that file is fsynced and renamed over ``path`` (a reader sees
    the old file or the whole new one), when it raises the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TEMPORARY_MARKER}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_temporary(location: str | os.PathLike) -> bool:
    """A leftover of an interrupted :func:`atomic_local_path` write."""
    return TEMPORARY_MARKER in name(location)


def remove_temporary(folder: str | os.PathLike) -> list[str]:
    """Delete the leftovers of interrupted :func:`atomic_local_path` writes directly in
    ``folder`` (a writer killed between write and rename leaves one); returns their names.
    Call it only when no writer of this job is active: at the start of a job and after its
    workers have all finished."""
    if is_remote(folder) or not Path(folder).is_dir():
        return []  # S3 objects appear only when complete: nothing half-written to remove
    removed = []
    for p in list_files(folder, recursive=False):
        if is_temporary(p):
            Path(p).unlink(missing_ok=True)
            removed.append(name(p))
    return removed


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically (see the module doc), creating parent folders."""
    if is_remote(location):
        s3, path = filesystem(location)
        with s3.open_output_stream(path) as f:
            f.write(data)
        return
    with atomic_local_path(location) as tmp:
        tmp.write_bytes(data)


def delete(location: str | os.PathLike) -> None:
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    s3, path = filesystem(location)
    if is_file(location):
        s3.delete_file(path)


def list_files(location: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Sorted files under a folder/prefix, as locations of the same kind as ``location``
    (local paths are absolute; links are followed)."""
    if not is_remote(location):
        root = Path(location)
        if not recursive:
            return sorted(str(p.absolute()) for p in root.iterdir() if p.is_file())
        return sorted(str(Path(d, f).absolute()) for d, _, files in os.walk(root, followlinks=True)
                      for f in files)
    from pyarrow import fs as pafs

    s3, path = filesystem(location)
    infos = s3.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return sorted(f"s3://{i.path}" for i in infos if i.type == pafs.FileType.File)


def makedirs(location: str | os.PathLike) -> None:
    """Create a local folder; S3 has no folders (a prefix exists once it holds objects)."""
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------- bulk copies
def upload_dir(local: str | os.PathLike, location: str | os.PathLike) -> list[str]:
    """Copy every file under the local folder to ``location`` (same relative names);
    returns the destination locations. Locally this is a plain copy."""
    local = Path(local)
    written = []
    for src in sorted(p for p in local.rglob("*") if p.is_file()):
        dest = join(location, src.relative_to(local).as_posix())
        if is_remote(location):
            s3, path = filesystem(dest)
            with open(src, "rb") as fin, s3.open_output_stream(path) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        else:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        written.append(dest)
    return written


def download(location: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy one file to the local path ``local`` (for libraries that need a real file)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(location):
        shutil.copyfile(location, local)
        return local
    s3, path = filesystem(location)
    with s3.open_input_stream(path) as fin, open(local, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return local


def download_dir(location: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy every file under a folder/prefix into the local folder ``local``."""
    local = Path(local)
    prefix = str(location).rstrip("/") + "/"
    for src in list_files(location):
        rel = src[len(prefix):] if is_remote(location) else str(Path(src).relative_to(Path(location).absolute()))
        download(src, local / rel)
    return local


def local_cache(location: str | os.PathLike) -> Path:
    """A stable local folder standing for a remote ``location`` on this machine
    (``$MAR3D_CACHE_DIR``, default ``~/.cache/mar3d``, then bucket/key): files that must be
    local and must survive a re-run (a tracking backlog) live there."""
    bucket, key = _split_s3(str(location))
    base = Path(os.environ.get("MAR3D_CACHE_DIR") or Path.home() / ".cache" / "mar3d")
    return base / "s3" / bucket / key


def local_staging(location: str | os.PathLike) -> Path:
    """A fresh local folder to build outputs in before :func:`upload_dir` puts them at a
    remote ``location`` (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=f"mar3d-{name(location) or 'out'}-"))
