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


def inputs_hash(clips: list[ClipSource]) -> str:
    """A hash of the input list (keys, paths, captions, spans, file sizes and mtimes): changes when any
    input is added, removed, re-captioned or rewritten."""
    digest = hashlib.sha256()
    for clip in sorted(clips, key=lambda c: c.key):
        stat = Path(clip.path).stat()
        digest.update(json.dumps([asdict(clip), stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()[:16]


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
