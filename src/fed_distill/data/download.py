"""Downloading a dataset's official files: streamed through a ``.part`` file, checksum-verified
(md5 or sha256), then unpacked safely (tar members with absolute paths, '..', links or devices
are refused; extraction goes through a hidden folder so a killed run leaves no truncated file).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fed_distill.artifacts import atomic_path
from fed_distill.errors import DatasetError

ENV_VAR = "FED_DISTILL_DATA"  # where users put dataset folders (read by data.sources)
DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation, not for the whole transfer


@dataclass(frozen=True)
class Download:
    url: str
    checksum: str  # md5 (32 hex digits) or sha256 (64)
    unpack: str = ""  # "": keep as is; "tar": extract; "zip:MEMBER": extract that one member


def verify_checksum(path: str | os.PathLike[str], expected: str) -> None:
    """Raise DatasetError unless the file's md5 (32 hex digits) or sha256 (64) is ``expected``."""
    algo = {32: "md5", 64: "sha256"}.get(len(expected))
    if algo is None:
        raise ValueError(f"checksum {expected!r} is neither an md5 nor a sha256 hex digest")
    path = Path(path)
    digest = hashlib.new(algo)
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise DatasetError(f"cannot read {path} to verify it: {exc}") from None
    if digest.hexdigest() != expected.lower():
        raise DatasetError(
            f"{path} has {algo} {digest.hexdigest()}, expected {expected}; the file is corrupt "
            "or not the official one, delete it and download it again"
        )


def safe_extract_tar(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract a tarball into ``dest``, refusing absolute paths, '..', links and devices."""
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    raise DatasetError(
                        f"{archive}: refusing to extract member {m.name!r} (absolute path, '..' "
                        "or a link/device); the archive is not the official one, delete it"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            # Into a hidden folder first, then each file renamed into place: a killed
            # extraction never leaves a truncated data file that a later load would trust.
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
            try:
                tar.extractall(staging, members=members, filter="data")
                for m in members:
                    if m.isfile():
                        target = dest / PurePosixPath(m.name)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(staging / PurePosixPath(m.name), target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except DatasetError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"cannot extract {archive} ({type(exc).__name__}: {exc}); delete it and download "
            "it again"
        ) from None


def _extract_zip_member(archive: Path, member: str, dest: Path) -> None:
    try:
        with (
            zipfile.ZipFile(archive) as zf,
            zf.open(member) as src,
            atomic_path(dest) as tmp,
            tmp.open("wb") as out,
        ):
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"cannot extract {member} from {archive} ({type(exc).__name__}: {exc}); delete it "
            "and download it again"
        ) from None


def _download(name: str, url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` (through a .part file so a broken transfer leaves nothing)."""
    part = dest.with_name(dest.name + ".part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "fed-distill"})
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with part.open("wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        os.replace(part, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(
            f"{name}: could not download {url} ({reason}); download it yourself and put it "
            f"in {dest.parent} (or unpack the dataset anywhere and set {ENV_VAR}=DIR)"
        ) from None


def fetch_into(name: str, downloads: tuple[Download, ...], target: Path) -> None:
    """Download (unless already there), verify and unpack each of ``downloads`` into ``target``."""
    for dl in downloads:
        archive = target / dl.url.rsplit("/", 1)[-1]
        fetched = not archive.is_file()  # a file placed there by hand is used as is
        if fetched:
            _download(name, dl.url, archive)
        try:
            verify_checksum(archive, dl.checksum)
        except DatasetError as exc:
            raise DatasetError(f"{name}: {exc}") from None
        if dl.unpack == "tar":
            safe_extract_tar(archive, target)
        elif dl.unpack.startswith("zip:"):
            member = dl.unpack[4:]
            _extract_zip_member(archive, member, target / PurePosixPath(member).name)
        if dl.unpack and fetched:
            archive.unlink()
