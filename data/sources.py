"""Find the clips of a dataset: a folder of videos with same-stem `.txt` captions, or CSV/JSONL metadata.

Bad inputs never raise here (unless `strict`): each becomes a `Skip(path, reason)`, so one broken file
never stops a large caching run, and every skip is listed in the cache manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
CAPTION_EXTENSION = ".txt"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipSource:
    """One clip to cache: a video file (optionally the span `[start, end)` seconds) and its caption."""

    key: str  # unique id: the path relative to the dataset root without extension (+ @start-end)
    path: str
    caption: str
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class Skip:
    """An input left out of the cache, and why."""

    path: str
    reason: str


class BadInputError(ValueError):
    """A bad input under `strict=True`; the message names the file and the reason."""


def report_skip(skip: Skip, strict: bool) -> Skip:
    """Log a skipped input, or raise `BadInputError` naming it when `strict`."""
    if strict:
        raise BadInputError(f"{skip.path}: {skip.reason} (set data.strict=false to skip bad inputs instead)")
    log.warning("skipping %s: %s", skip.path, skip.reason)
    return skip


def discover(source: str | Path) -> tuple[list[ClipSource], list[Skip]]:
    """List the clips of ``source`` (a folder, or a ``.csv``/``.jsonl`` metadata file), sorted by key,
    and the inputs that cannot be used (pass each to `report_skip`)."""
    source = Path(source)
    if source.is_dir():
        clips, skips = _from_folder(source)
    elif source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        clips, skips = _from_metadata(source)
    else:
        raise FileNotFoundError(
            f"data.source={str(source)!r} is neither a folder nor a .csv/.jsonl metadata file "
            "(create the demo dataset with `python scripts/make_demo_dataset.py`)"
        )
    clips, duplicate_skips = _drop_duplicates(clips)
    return sorted(clips, key=lambda c: c.key), skips + duplicate_skips


# Bytes read from each end of a file for its content digest (see `content_digest`).
DIGEST_SPAN = 1 << 20


def content_digest(path: str | Path, size: int) -> str:
    """A digest of a file's size, first MiB and last MiB (the whole file when it is under 2 MiB).

    Why not a full hash: the check runs over every input, and a full read of a large video dataset
    costs as much as decoding it. Why not mtimes: copying, `touch`, or regenerating identical files
    changes them without changing what gets cached. Size + both ends catch re-encodes, trims, appends
    and truncation (the container header sits at one end, the mp4 index at one end, and a re-encode
    changes both); an in-place edit of middle bytes that keeps the size is the one change it misses.
    It is computed only for files whose (size, mtime) differs from the recorded one (`input_records`),
    so checking an unchanged dataset reads no file content at all."""
    digest = hashlib.blake2b(str(size).encode(), digest_size=8)
    with open(path, "rb") as f:
        digest.update(f.read(DIGEST_SPAN))
        if size > DIGEST_SPAN:
            f.seek(max(DIGEST_SPAN, size - DIGEST_SPAN))
            digest.update(f.read())
    return digest.hexdigest()


def input_records(clips: list[ClipSource], known: dict[str, dict] | None = None) -> dict[str, dict]:
    """What each clip was cached from: ``key -> {path, caption, start, end, size, mtime_ns, digest}``.

    ``known`` (the records of an earlier run) lends its digest to a file whose size and mtime are
    unchanged, so only new or touched files are read (`content_digest`). The mtime is kept only for
    that shortcut; it is no part of `inputs_hash`."""
    known = known or {}
    records = {}
    for clip in sorted(clips, key=lambda c: c.key):
        stat = Path(clip.path).stat()
        record = {**asdict(clip), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        del record["key"]
        old = known.get(clip.key)
        same_file = old and all(old.get(k) == record[k] for k in ("path", "size", "mtime_ns"))
        record["digest"] = old["digest"] if same_file else content_digest(clip.path, stat.st_size)
        records[clip.key] = record
    return records


# What `inputs_hash` covers, and `diff_inputs` compares: everything in a record but the mtime.
COMPARED = ("path", "caption", "start", "end", "size", "digest")


def inputs_hash(records: dict[str, dict]) -> str:
    """A hash of the input list (`input_records`: keys, paths, captions, spans, sizes, content digests):
    changes when an input is added, removed, re-captioned or its content changes, not when it is only
    touched or copied with new mtimes."""
    rows = [[key, *(records[key][k] for k in COMPARED)] for key in sorted(records)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def diff_inputs(recorded: dict[str, dict], current: dict[str, dict], limit: int = 20) -> list[str]:
    """Human-readable changes between two `input_records`: ``added: key (path)``, ``removed: ...``,
    ``modified: key (path): content changed (size A -> B)`` / ``caption 'a' -> 'b'`` / ...; at most
    ``limit`` lines per kind, then a count of the rest."""
    added = [f"added: {k} ({current[k]['path']})" for k in sorted(set(current) - set(recorded))]
    removed = [f"removed: {k} ({recorded[k]['path']})" for k in sorted(set(recorded) - set(current))]
    modified = []
    for key in sorted(set(recorded) & set(current)):
        old, new = recorded[key], current[key]
        changes = [
            f"{k} {old.get(k)!r} -> {new[k]!r}"
            for k in ("path", "caption", "start", "end")
            if old.get(k) != new[k]
        ]
        if (old.get("size"), old.get("digest")) != (new["size"], new["digest"]):
            changes.append(f"content changed (size {old.get('size')} -> {new['size']} bytes)")
        if changes:
            modified.append(f"modified: {key} ({new['path']}): " + "; ".join(changes))
    lines = []
    for kind in (added, removed, modified):
        lines += kind[:limit] + ([f"... and {len(kind) - limit} more"] if len(kind) > limit else [])
    return lines


def _read_caption(path: Path) -> str:
    """The stripped caption text; raises ValueError with the reason when unusable."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"caption {path.name} is not UTF-8 ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise ValueError(f"caption {path.name} is empty")
    return " ".join(text.split())


def _from_folder(root: Path) -> tuple[list[ClipSource], list[Skip]]:
    clips, skips = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        ext = path.suffix.lower()
        if ext == CAPTION_EXTENSION:
            continue
        if ext not in VIDEO_EXTENSIONS:
            skips.append(
                Skip(str(path), f"unsupported extension {ext or '(none)'!r} (allowed: {VIDEO_EXTENSIONS})")
            )
            continue
        caption_path = path.with_suffix(CAPTION_EXTENSION)
        if not caption_path.exists():
            skips.append(Skip(str(path), f"missing caption {caption_path.name}"))
            continue
        try:
            caption = _read_caption(caption_path)
        except ValueError as err:
            skips.append(Skip(str(path), str(err)))
            continue
        clips.append(ClipSource(path.relative_to(root).with_suffix("").as_posix(), str(path), caption))
    return clips, skips


def _rows(path: Path):
    """Yield ``(row number, dict or error message)`` for each data row of a CSV or JSONL file."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):  # row 1 is the header
                yield n, row if None not in row else "more fields than the header"
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield n, f"invalid JSON ({err.msg})"
                continue
            yield n, row if isinstance(row, dict) else "not a JSON object"


def _seconds(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None or value == "":
        return None
    seconds = float(value)  # ValueError names the bad value
    if seconds < 0:
        raise ValueError(f"{key}={value!r} is negative")
    return seconds


def _from_metadata(meta: Path) -> tuple[list[ClipSource], list[Skip]]:
    """Rows need `path` (absolute or relative to the metadata file) and `caption`; `start`/`end` are
    optional seconds."""
    clips, skips = [], []
    root = meta.parent
    for n, row in _rows(meta):
        where = f"{meta}:{n}"
        if isinstance(row, str):
            skips.append(Skip(where, f"unreadable row: {row}"))
            continue
        rel = str(row.get("path") or "").strip()
        if not rel:
            skips.append(Skip(where, "unreadable row: missing 'path'"))
            continue
        path = (root / rel).resolve()
        caption = " ".join(str(row.get("caption") or "").split())
        try:
            start, end = _seconds(row, "start"), _seconds(row, "end")
        except ValueError as err:
            skips.append(Skip(where, f"unreadable row: bad start/end: {err}"))
            continue
        reason = None
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            reason = f"unsupported extension {path.suffix or '(none)'!r} (allowed: {VIDEO_EXTENSIONS})"
        elif not path.is_file():
            reason = "file not found"
        elif not caption:
            reason = "missing or empty caption"
        elif "\ufffd" in caption:
            reason = "caption is not UTF-8"
        elif start is not None and end is not None and end <= start:
            reason = f"unreadable row: end={end} <= start={start}"
        if reason:
            skips.append(Skip(f"{where} ({rel})", reason))
            continue
        key = Path(rel).with_suffix("").as_posix()
        if start is not None or end is not None:
            key += f"@{start or 0:g}-{'end' if end is None else f'{end:g}'}"
        clips.append(ClipSource(key, str(path), caption, start, end))
    return clips, skips


def _drop_duplicates(clips: list[ClipSource]) -> tuple[list[ClipSource], list[Skip]]:
    """Keep the first clip of each key (e.g. `a.mp4` and `a.webm` share `a.txt`); skip the rest."""
    kept, skips = {}, []
    for clip in sorted(clips, key=lambda c: (c.key, c.path)):
        if clip.key in kept:
            skips.append(
                Skip(clip.path, f"duplicate stem {clip.key!r} (already used by {kept[clip.key].path})")
            )
        else:
            kept[clip.key] = clip
    return list(kept.values()), skips
