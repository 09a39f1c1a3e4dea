"""Streamed gate-training data: image + caption sources read lazily, encodings cached in shards.

For data sets that do not fit in memory (the paper trains the gates on 540 k images). Nothing here holds
the data set: per sample only its training size (bucket) and style label are kept (a few bytes), the
pixels are read when a batch needs them and the encodings live on disk.

Sources (:func:`open_source`)
-----------------------------
- **a folder**: ``name.png`` + ``name.txt`` (caption, UTF-8) [+ ``name.style``], the layout of
  :class:`~mepg_core.gate_training.ImageCaptionFolder` (``.png .jpg .jpeg .webp .bmp``; sorted; no
  sub-folders).
- **a JSONL file** (``.jsonl``): one ``{"image": PATH, "caption": TEXT, "style": LABEL}`` per line;
  ``PATH`` absolute or relative to the file's folder; ``style`` optional.
- **WebDataset-style tar shards**: a ``.tar`` file, a folder holding ``.tar`` files, a glob
  (``data/*.tar``) or a brace range (``data/shard-{00000..00099}.tar``). Members are grouped by key (the
  path up to the first dot of the file name, as webdataset and img2dataset write them): one image
  (``key.jpg`` …), the caption in ``key.txt`` (or the ``"caption"`` of ``key.json``), an optional style in
  ``key.style`` (or the ``"style"`` of ``key.json``). Shards are indexed from their headers (no image is
  decoded for that) and members are read by offset.

The manifest
------------
Aspect buckets need each image's size before batches can be cut, so a first scan reads every image's
header (not its pixels) and its style label, split over the processes and ``workers`` threads each. It
is stored as ``manifest.json`` in the cache folder with the source's fingerprint (file names, sizes and
modification times) and the sizing, and reused while both match.

The latent cache
----------------
A sample's encodings — the VAE latent ``[C, H/8, W/8]``, the text context ``[T, D]`` and the pooled text
vector ``[P]`` (when the encoder gives one) — are written the first time a batch needs them (the first
epoch), in the cache dtype (default float16), to ``cache-<random>.safetensors`` shards of about
``shard_mb`` (tensors ``s<index>.latent`` / ``.context`` / ``.pooled``; metadata ``mepg.format`` =
``mepg-latent-cache``, ``mepg.ids``), each written whole to a temporary name and renamed. Later epochs
(and later runs with the same ``cache_dir``) read them and never call the VAE or the text encoders.
Freshly encoded values are rounded to the cache dtype before use too, so every epoch trains on the same
numbers. ``cache.json`` records what the cache was made from (source, sizing, encoder, dtype); a cache
for anything else is refused, naming the difference. Processes write their own shards; at the end of an
epoch that still encoded, they write out what is buffered, wait for each other and re-read the folder.

Loading
-------
:meth:`StreamingLatentData.batches` reads the samples of the coming micro-batches on ``workers`` threads
(cache hits: the stored tensors; misses: decoded, sized pixels and the caption), at most ``prefetch``
micro-batches ahead; encoding runs in the calling thread (where the host's models live), one VAE call per
micro-batch (a micro-batch is one bucket). Each batch is what :class:`~mepg_core.gate_training.GateTrainer`
expects from a data set.
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .buckets import IMAGE_EXTENSIONS, Sizing, image_size
from .distributed import LocalRunner

CACHE_FORMAT = "mepg-latent-cache"
CACHE_VERSION = "1"
MANIFEST_VERSION = 1
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_TEXT_EXTENSIONS = ("txt", "style", "json")


class DataSourceError(ValueError):
    """A training sample cannot be read; the message names the file (and member or line)."""


# --------------------------------------------------------------------------------------------------
# Sources


class FolderSource:
    """``name.png`` + ``name.txt`` [+ ``name.style``] files of one folder (see the module docstring)."""

    kind = "folder"

    def __init__(self, folder: str | os.PathLike, allow_missing_captions: bool = False):
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise DataSourceError(f"{self.folder}: training data folder not found")
        self.allow_missing_captions = allow_missing_captions
        stats = {}
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS + (".txt", ".style")):
                    st = entry.stat()
                    stats[entry.name] = (st.st_size, st.st_mtime_ns)
        self.names = sorted(n for n in stats if n.lower().endswith(IMAGE_EXTENSIONS))
        if not self.names:
            raise DataSourceError(f"{self.folder}: no training images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                                  "files, each with a same-named .txt caption beside it)")
        self.fingerprint = _digest(self.kind, sorted(stats.items()))

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return os.path.join(self.folder, self.names[index])

    def open_image(self, index: int):
        return open(self.name(index), "rb")

    def text(self, index: int) -> tuple[str, str | None]:
        stem = os.path.splitext(self.name(index))[0]
        caption = _read_text(stem + ".txt")
        if caption is None:
            if not self.allow_missing_captions:
                raise DataSourceError(f"{self.folder}: '{self.names[index]}' has no caption file "
                                      f"'{os.path.basename(stem)}.txt'")
            caption = ""
        return caption, _read_text(stem + ".style") or None


class JsonlSource:
    """One ``{"image", "caption", "style"?}`` object per line of a ``.jsonl`` file; lines are found by
    their byte offsets and parsed when a sample is read."""

    kind = "jsonl"

    def __init__(self, path: str | os.PathLike, allow_missing_captions: bool = False):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise DataSourceError(f"{self.path}: training data file not found")
        self.root = os.path.dirname(os.path.abspath(self.path))
        self.allow_missing_captions = allow_missing_captions
        offsets, lines = [], []
        position = 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    offsets.append(position)
                    lines.append(number)
                position += len(line)
        if not offsets:
            raise DataSourceError(f"{self.path}: no samples (expected one JSON object per line)")
        self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self.lines = torch.tensor(lines, dtype=torch.int64)
        st = os.stat(self.path)
        self.fingerprint = _digest(self.kind, os.path.abspath(self.path), st.st_size, st.st_mtime_ns)

    def __len__(self) -> int:
        return int(self.offsets.numel())

    def _record(self, index: int) -> dict:
        where = f"{self.path}:{int(self.lines[index])}"
        with open(self.path, "rb") as handle:
            handle.seek(int(self.offsets[index]))
            line = handle.readline()
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DataSourceError(f"{where}: not JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
            raise DataSourceError(f"{where}: needs an 'image' path (string)")
        for key in ("caption", "style"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise DataSourceError(f"{where}: '{key}' must be a string")
        return record

    def name(self, index: int) -> str:
        return f"{self.path}:{int(self.lines[index])} ({self._record(index)['image']})"

    def open_image(self, index: int):
        path = os.path.join(self.root, self._record(index)["image"])
        if not os.path.isfile(path):
            raise DataSourceError(f"{self.path}:{int(self.lines[index])}: image file {path} not found")
        return open(path, "rb")

    def text(self, index: int) -> tuple[str, str | None]:
        record = self._record(index)
        caption = record.get("caption")
        if caption is None:
            if not self.allow_missing_captions:
                raise DataSourceError(f"{self.path}:{int(self.lines[index])}: no 'caption'")
            caption = ""
        return " ".join(caption.split()), (record.get("style") or "").strip() or None


class TarShardSource:
    """WebDataset-style tar shards (see the module docstring), indexed from their member headers."""

    kind = "tar"

    def __init__(self, shards: Sequence[str], allow_missing_captions: bool = False, workers: int = 4):
        self.shards = list(shards)
        if not self.shards:
            raise DataSourceError("no tar shards given")
        self.allow_missing_captions = allow_missing_captions
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            indexed = list(pool.map(_index_shard, self.shards))
        rows: list[tuple[int, str, dict]] = []
        for shard_index, samples in enumerate(indexed):
            rows.extend((shard_index, key, members) for key, members in samples)
        if not rows:
            raise DataSourceError(f"{self.shards[0]} …: the shards hold no image samples (members named "
                                  f"KEY{'/KEY'.join(IMAGE_EXTENSIONS)} with KEY.txt captions)")
        self.keys = [key for _, key, _ in rows]
        # Per sample: shard, then (offset, size) of the image, caption, style and json members (-1: none).
        table = torch.full((len(rows), 9), -1, dtype=torch.int64)
        for row, (shard_index, _key, members) in enumerate(rows):
            table[row, 0] = shard_index
            for column, part in enumerate(("image", "txt", "style", "json")):
                if part in members:
                    table[row, 1 + 2 * column], table[row, 2 + 2 * column] = members[part]
        self.table = table
        stats = [(os.path.abspath(s), os.stat(s).st_size, os.stat(s).st_mtime_ns) for s in self.shards]
        self.fingerprint = _digest(self.kind, stats)

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, index: int) -> str:
        return f"{self.shards[int(self.table[index, 0])]}:{self.keys[index]}"

    def _member(self, index: int, column: int) -> bytes | None:
        offset, size = int(self.table[index, 1 + 2 * column]), int(self.table[index, 2 + 2 * column])
        if offset < 0:
            return None
        with open(self.shards[int(self.table[index, 0])], "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise DataSourceError(f"{self.name(index)}: the shard ends inside this member (truncated file?)")
        return data

    def open_image(self, index: int):
        return io.BytesIO(self._member(index, 0))

    def text(self, index: int) -> tuple[str, str | None]:
        caption = _decode(self._member(index, 1), self.name(index))
        style = _decode(self._member(index, 2), self.name(index))
        raw_json = self._member(index, 3)
        if raw_json is not None:
            try:
                record = json.loads(raw_json)
            except ValueError as error:
                raise DataSourceError(f"{self.name(index)}.json: not JSON ({error})") from None
            if isinstance(record, dict):
                if caption is None and isinstance(record.get("caption"), str):
                    caption = record["caption"]
                if style is None and isinstance(record.get("style"), str):
                    style = record["style"]
        if caption is None:
            if not self.allow_missing_captions:
                raise DataSourceError(f"{self.name(index)}: no caption (a .txt member or a 'caption' in .json)")
            caption = ""
        return " ".join(caption.split()), (style or "").strip() or None


def _index_shard(path: str) -> list[tuple[str, dict]]:
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, extension = base.split(".", 1)
                extension = extension.lower()
                part = "image" if "." + extension in IMAGE_EXTENSIONS else extension
                if part != "image" and part not in _TEXT_EXTENSIONS:
                    continue
                members = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
                if part in members:
                    raise DataSourceError(f"{path}: sample '{stem}' has two '{part}' members")
                members[part] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as error:
        raise DataSourceError(f"{path}: not a readable tar shard ({error})") from None
    return [(key, members) for key, members in samples.items() if "image" in members]


def expand_shards(spec: str) -> list[str]:
    """Shard paths from ``a.tar``, a folder of ``.tar`` files, a glob, or ``x-{000..009}.tar`` ranges."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    patterns = [spec]
    while any(re.search(r"\{(\d+)\.\.(\d+)\}", p) for p in patterns):
        expanded = []
        for pattern in patterns:
            match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
            if match is None:
                expanded.append(pattern)
                continue
            first, last = match.group(1), match.group(2)
            width = len(first) if first.startswith("0") else 0
            for number in range(int(first), int(last) + 1):
                expanded.append(pattern[: match.start()] + str(number).zfill(width) + pattern[match.end():])
        patterns = expanded
    paths = []
    for pattern in patterns:
        paths.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataSourceError(f"tar shard {missing[0]} not found" + (f" (and {len(missing) - 1} more)"
                                                                     if len(missing) > 1 else ""))
    return paths


def open_source(spec: str | os.PathLike, allow_missing_captions: bool = False, workers: int = 4):
    """A folder, a ``.jsonl`` file, or tar shards (``.tar`` / folder of them / glob / brace range)."""
    spec = os.fspath(spec)
    if spec.lower().endswith(".jsonl"):
        return JsonlSource(spec, allow_missing_captions)
    is_tar_folder = os.path.isdir(spec) and glob.glob(os.path.join(glob.escape(spec), "*.tar"))
    if spec.lower().endswith(".tar") or is_tar_folder or glob.has_magic(spec) or "{" in spec:
        return TarShardSource(expand_shards(spec), allow_missing_captions, workers)
    if os.path.isdir(spec):
        return FolderSource(spec, allow_missing_captions)
    raise DataSourceError(f"{spec}: training data not found (a folder of images, a .jsonl file, or .tar shards)")


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def _decode(data: bytes | None, where: str) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataSourceError(f"{where}: a text member is not UTF-8") from None


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# Manifest: training size and style of every sample


class Manifest:
    """Per sample: the index of its training size in ``sizes`` and of its style in ``style_names``."""

    def __init__(self, sizes: list[tuple[int, int]], bucket_of: torch.Tensor, style_names: list[str],
                 style_of: torch.Tensor, key: str):
        self.sizes, self.bucket_of = sizes, bucket_of
        self.style_names, self.style_of, self.key = style_names, style_of, key

    def __len__(self) -> int:
        return int(self.bucket_of.numel())

    def to_json(self) -> str:
        return json.dumps({"version": MANIFEST_VERSION, "key": self.key, "sizes": self.sizes,
                           "bucket_of": self.bucket_of.tolist(), "style_names": self.style_names,
                           "style_of": self.style_of.tolist()})

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls([tuple(s) for s in data["sizes"]], torch.tensor(data["bucket_of"], dtype=torch.int32),
                   data["style_names"], torch.tensor(data["style_of"], dtype=torch.int32), data["key"])


def _scan_one(source, sizing: Sizing, index: int) -> tuple[tuple[int, int], str | None]:
    try:
        with source.open_image(index) as handle:
            width, height = image_size(handle)
    except DataSourceError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a bad file; name the file
        raise DataSourceError(f"{source.name(index)}: not a readable image ({error})") from None
    _caption, style = source.text(index)  # also checks that the caption is there
    return sizing.target_size(width, height), style


def build_manifest(source, sizing: Sizing, runner: LocalRunner, workers: int = 4,
                   progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Scan every sample's image header and style: rank ``r`` takes samples ``r, r + W, …`` on ``workers``
    threads; the parts are gathered on every rank."""
    mine = range(runner.rank, len(source), runner.world_size)
    found: list[tuple[tuple[int, int], str | None]] = []
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for done, item in enumerate(pool.map(lambda i: _scan_one(source, sizing, i), mine), 1):
            found.append(item)
            if progress is not None and (done % 1000 == 0 or done == len(mine)):
                progress(done, len(mine))
    parts = runner.gather_objects(found)
    sizes: dict[tuple[int, int], int] = {}
    styles: dict[str, int] = {}
    bucket_of = torch.empty(len(source), dtype=torch.int32)
    style_of = torch.empty(len(source), dtype=torch.int32)
    for rank, part in enumerate(parts):
        for offset, (size, style) in enumerate(part):
            index = rank + offset * runner.world_size
            bucket_of[index] = sizes.setdefault(tuple(size), len(sizes))
            style_of[index] = -1 if style is None else styles.setdefault(style, len(styles))
    return Manifest(list(sizes), bucket_of, list(styles), style_of, manifest_key(source, sizing))


def manifest_key(source, sizing: Sizing) -> str:
    return _digest(source.fingerprint, sizing.settings())


# --------------------------------------------------------------------------------------------------
# Latent cache


class LatentCache:
    """Sharded ``.safetensors`` files of encoded samples (see the module docstring).

    ``lookup``: per sample the index of a shard holding it (-1: not cached). Shards are opened for each
    read and closed again, so reading keeps no file mapped and memory stays flat however much is read.
    """

    def __init__(self, folder: str, count: int, dtype: torch.dtype = torch.float16, shard_mb: float = 256.0):
        self.folder, self.dtype = folder, dtype
        self.shard_bytes = max(1, int(shard_mb * 2**20))
        self.lookup = torch.full((count,), -1, dtype=torch.int32)
        self.files: list[str] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_ids: list[int] = []
        self._buffered_bytes = 0
        self.refresh()

    def refresh(self) -> int:
        """Index shards that appeared since the last call (written by any process); returns how many."""
        known = set(self.files)
        new = sorted(p for p in glob.glob(os.path.join(glob.escape(self.folder), "cache-*.safetensors"))
                     if not p.endswith(".partial.safetensors") and os.path.basename(p) not in known)
        for path in new:
            with safe_open(path, framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("mepg.format") != CACHE_FORMAT:
                raise ValueError(f"{path}: not a latent-cache shard (metadata 'mepg.format')")
            ids = torch.tensor(json.loads(metadata["mepg.ids"]), dtype=torch.int64)
            if ids.numel() and int(ids.max()) >= self.lookup.numel():
                raise ValueError(f"{path}: sample {int(ids.max())} is beyond this data set's {self.lookup.numel()}")
            number = len(self.files)
            self.files.append(os.path.basename(path))
            fresh = ids[self.lookup[ids] < 0]
            self.lookup[fresh] = number
        return len(new)

    def has(self, index: int) -> bool:
        return int(self.lookup[index]) >= 0

    def missing(self) -> int:
        return int((self.lookup < 0).sum())

    def read(self, index: int) -> dict[str, torch.Tensor]:
        """``{"latent": [C, h, w], "context": [T, D], "pooled": [P] (when stored)}`` in the cache dtype."""
        path = os.path.join(self.folder, self.files[int(self.lookup[index])])
        with safe_open(path, framework="pt", device="cpu") as handle:
            names = [n for n in (f"s{index}.latent", f"s{index}.context", f"s{index}.pooled") if n in handle.keys()]
            return {name.rsplit(".", 1)[1]: handle.get_tensor(name).clone() for name in names}

    def add(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        for part, tensor in tensors.items():
            value = tensor.detach().to("cpu", self.dtype).contiguous()
            self._buffer[f"s{index}.{part}"] = value
            self._buffered_bytes += value.numel() * value.element_size()
        self._buffer_ids.append(index)
        if self._buffered_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered samples as one shard (atomically) and index it; returns its path."""
        if not self._buffer_ids:
            return None
        name = f"cache-{uuid.uuid4().hex[:16]}.safetensors"
        path = os.path.join(self.folder, name)
        partial = path[: -len(".safetensors")] + ".partial.safetensors"
        save_file(self._buffer, partial, metadata={"mepg.format": CACHE_FORMAT, "mepg.version": CACHE_VERSION,
                                                   "mepg.ids": json.dumps(self._buffer_ids)})
        os.replace(partial, path)
        number = len(self.files)
        self.files.append(name)
        ids = torch.tensor(self._buffer_ids, dtype=torch.int64)
        self.lookup[ids[self.lookup[ids] < 0]] = number
        self._buffer, self._buffer_ids, self._buffered_bytes = {}, [], 0
        return path


def _check_cache_settings(folder: str, settings: dict, runner: LocalRunner) -> None:
    path = os.path.join(folder, "cache.json")
    if runner.is_main:
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(path):
            partial = path + ".partial"
            with open(partial, "w", encoding="utf-8") as handle:
                json.dump(settings, handle, indent=1, sort_keys=True)
            os.replace(partial, path)
    runner.barrier()
    with open(path, encoding="utf-8") as handle:
        stored = json.load(handle)
    for key, value in settings.items():
        if stored.get(key) != value:
            raise ValueError(f"{folder}: this latent cache was made with {key} = {stored.get(key)!r}, this run has "
                             f"{value!r}; use another --cache-dir (or delete this one)")


# --------------------------------------------------------------------------------------------------
# Prefetch


def prefetch(fetch: Callable[[Any], Any], items: Iterable[Any], workers: int = 2, depth: int = 4) -> Iterator[Any]:
    """``fetch(item)`` for each item on ``workers`` threads, results in order, at most ``depth`` ahead of
    the consumer (``workers`` 0: in the calling thread)."""
    if workers <= 0:
        yield from map(fetch, items)
        return
    items = iter(items)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mepg-data")
    pending: collections.deque = collections.deque(pool.submit(fetch, item)
                                                   for item in itertools.islice(items, max(1, depth)))
    try:
        while pending:
            result = pending.popleft().result()
            following = next(items, _END)
            if following is not _END:
                pending.append(pool.submit(fetch, following))
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()


# --------------------------------------------------------------------------------------------------
# The data set the trainer sees


class _Styles(Sequence):
    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        value = int(self.manifest.style_of[index])
        return None if value < 0 else self.manifest.style_names[value]


EncodeImage = Callable[[torch.Tensor], torch.Tensor]  # [B, H, W, 3] in [0, 1] -> raw latents [B, C, H/8, W/8]
EncodeText = Callable[[str], tuple[torch.Tensor, torch.Tensor | None]]  # caption -> (context [T, D], pooled [P])


class StreamingLatentData:
    """A streamed data set for :class:`~mepg_core.gate_training.GateTrainer` (see the module docstring).

    Args:
        source: from :func:`open_source`.
        sizing: the :class:`~.buckets.Sizing` images are trained at.
        cache_dir: the latent cache folder (the manifest goes there too).
        encode_image: ``pixels [B, H, W, 3] → raw VAE latents [B, C, H/8, W/8]`` (ComfyUI LATENT samples).
        encode_text: ``caption → (context [T, D], pooled [P] or None)``.
        latent_in: raw latents ``[B, C, h, w]`` → the model's input space (ComfyUI: ``process_latent_in``).
        make_cond: ``(context [T, D], pooled [P] | None, model-space latent [C, h, w]) → the host's
            conditioning object for ``denoise_fn````.
        runner: this process's runner (sharding of the manifest scan, cache synchronisation).
        encoder: names the encoders (part of the cache's identity: another base model needs another cache).
        cache_dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        workers / prefetch: reading threads and how many micro-batches they may read ahead.
    """

    def __init__(self, source, sizing: Sizing, cache_dir: str, encode_image: EncodeImage, encode_text: EncodeText,
                 latent_in: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 make_cond: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], Any] | None = None,
                 runner: LocalRunner | None = None, *, encoder: str = "", cache_dtype: str = "float16",
                 shard_mb: float = 256.0, workers: int = 2, prefetch: int = 4,
                 progress: Callable[[int, int], None] | None = None):
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}")
        if workers < 0 or prefetch < 1:
            raise ValueError("workers must be ≥ 0 and prefetch ≥ 1")
        self.source, self.sizing, self.cache_dir = source, sizing, os.fspath(cache_dir)
        self.runner = runner or LocalRunner()
        self.encode_image, self.encode_text = encode_image, encode_text
        self.latent_in = latent_in or (lambda latents: latents)
        self.make_cond = make_cond or (lambda context, pooled, latent: {"context": context, "pooled": pooled})
        self.workers, self.depth = workers, prefetch
        _check_cache_settings(self.cache_dir, {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                               "source": source.fingerprint, **sizing.settings(),
                                               "encoder": encoder, "dtype": cache_dtype}, self.runner)
        self.manifest = self._manifest(progress)
        self.fingerprint = self.manifest.key
        self.styles = _Styles(self.manifest)
        self.cache = LatentCache(self.cache_dir, len(source), CACHE_DTYPES[cache_dtype], shard_mb)
        self.encoded_images = 0  # VAE calls' samples in this process (0 once everything is cached)
        self.encoded_texts = 0

    def _manifest(self, progress) -> Manifest:
        path = os.path.join(self.cache_dir, "manifest.json")
        key = manifest_key(self.source, self.sizing)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                manifest = Manifest.from_json(handle.read())
            if manifest.key == key and len(manifest) == len(self.source):
                return manifest
        manifest = build_manifest(self.source, self.sizing, self.runner, max(1, self.workers), progress)
        if self.runner.is_main:
            with open(path + ".partial", "w", encoding="utf-8") as handle:
                handle.write(manifest.to_json())
            os.replace(path + ".partial", path)
        self.runner.barrier()
        return manifest

    def __len__(self) -> int:
        return len(self.manifest)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """``{(width, height): sample indices}`` in first-seen order."""
        order = torch.argsort(self.manifest.bucket_of, stable=True)
        counts = torch.bincount(self.manifest.bucket_of, minlength=len(self.manifest.sizes)).tolist()
        out, start = {}, 0
        for size, count in zip(self.manifest.sizes, counts):
            out[size] = order[start:start + count].tolist()
            start += count
        return out

    # -- reading
    def _fetch(self, indices: list[int]) -> list[tuple]:
        from PIL import Image

        items = []
        for index in indices:
            if self.cache.has(index):
                items.append(("cached", index, self.cache.read(index)))
                continue
            try:
                with self.source.open_image(index) as handle, Image.open(handle) as image:
                    pixels = self.sizing.pixels(image)
            except DataSourceError:
                raise
            except Exception as error:  # noqa: BLE001 - name the file whatever PIL raised
                raise DataSourceError(f"{self.source.name(index)}: not a readable image ({error})") from None
            caption, _style = self.source.text(index)
            items.append(("raw", index, pixels, caption))
        return items

    def _finish(self, items: list[tuple]) -> dict:
        encoded: dict[int, dict[str, torch.Tensor]] = {}
        raw = [item for item in items if item[0] == "raw"]
        if raw:
            with torch.no_grad():
                latents = self.encode_image(torch.stack([item[2] for item in raw]))
            self.encoded_images += len(raw)
            for row, (_kind, index, _pixels, caption) in enumerate(raw):
                with torch.no_grad():
                    context, pooled = self.encode_text(caption)
                self.encoded_texts += 1
                tensors = {"latent": latents[row], "context": context.reshape(context.shape[-2:])}
                if pooled is not None:
                    tensors["pooled"] = pooled.reshape(-1)
                tensors = {k: v.detach().to("cpu", self.cache.dtype) for k, v in tensors.items()}
                self.cache.add(index, tensors)
                encoded[index] = tensors
        for kind, index, *rest in items:
            if kind == "cached":
                encoded[index] = rest[0]
        order = [item[1] for item in items]
        shapes = {tuple(encoded[i]["latent"].shape) for i in order}
        if len(shapes) != 1:
            raise ValueError(f"a batch mixes latent sizes {sorted(shapes)} (the cache does not match the manifest)")
        x0 = self.latent_in(torch.stack([encoded[i]["latent"].float() for i in order]))
        conds = [self.make_cond(encoded[i]["context"].float(), encoded[i]["pooled"].float()
                                if "pooled" in encoded[i] else None, x0[row]) for row, i in enumerate(order)]
        return {"x0": x0.float(), "conds": conds, "styles": [self.styles[i] for i in order], "noise": None,
                "sigma": None}

    def batches(self, requests: Sequence[list[int]]) -> Iterator[dict]:
        """Training batches for the given micro-batches (lists of sample indices), read ahead."""
        for items in prefetch(self._fetch, requests, self.workers, self.depth):
            yield self._finish(items)

    # -- hooks the trainer calls
    def checkpoint(self) -> None:
        """Write out what is encoded so far (a checkpoint then finds it after a restart)."""
        self.cache.flush()

    def end_epoch(self, runner: LocalRunner | None = None) -> None:
        """After an epoch that encoded: write out, wait for every process, index what they wrote."""
        runner = runner or self.runner
        incomplete = torch.tensor([float(self.cache.missing() > 0 or bool(self.cache._buffer_ids))],
                                  dtype=torch.float64)
        if float(runner.all_sum(incomplete)[0]) == 0:
            return
        self.cache.flush()
        runner.barrier()
        self.cache.refresh()
