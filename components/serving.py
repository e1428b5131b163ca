"""The serving pointer: which codebook, SemID store and ranker champion serve, named together in one file.

    models/serving.json        {"seq", "as_of", "codebook_version", "codebook", "store", "champion", "ranker",
                                "pinned"}
    models/serving_log.jsonl   every switch, oldest first, one triple per line ("seq" counts them from 1)

Readers resolve all three from the one file, which moves with one atomic rename (`switch`), so nobody ever sees a
codebook with another version's store or ranker. Every file a triple names stays on disk: `rollback` points back
at the switch before the one serving and pins it, so no challenger switches it forward again until `unpin`.
A ranker that looks up no SemIDs (ranker.item_ids and history.item_ids not "semid") serves with codebook and store
null.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from components.errors import DataError
from components.storage import Layout, write_json, write_text


@dataclasses.dataclass(frozen=True)
class Serving:
    """One serving triple; paths are relative to the repository root."""
    seq: int
    as_of: str
    codebook_version: str | None
    codebook: str | None
    store: str | None
    champion: str
    ranker: str
    pinned: bool = False

    def files(self, root: Path) -> list[Path]:
        return [root / p for p in (self.codebook, self.store, self.ranker) if p is not None]


def triple(layout: Layout, as_of: str, codebook_version: str | None, champion: str, seq: int) -> Serving:
    """The triple of champion `champion` under `codebook_version`, with the paths the layout gives them."""
    def rel(path: Path) -> str:
        return path.relative_to(layout.root).as_posix()
    return Serving(seq=seq, as_of=as_of, codebook_version=codebook_version,
                   codebook=rel(layout.rqvae / f"{codebook_version}.pt") if codebook_version else None,
                   store=rel(layout.store(codebook_version)) if codebook_version else None,
                   champion=champion, ranker=rel(layout.ranker / f"{champion}.pt"))


def _parse(text: str, where: Path) -> Serving:
    try:
        return Serving(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: unreadable serving pointer, expected the fields of "
                        f"{[f.name for f in dataclasses.fields(Serving)]} ({exc})") from exc


def read(layout: Layout) -> Serving | None:
    """What serves now, or None before the first switch."""
    try:
        return _parse(layout.serving.read_text(), layout.serving)
    except FileNotFoundError:
        return None


def history(layout: Layout) -> list[Serving]:
    """Every switch so far, oldest first."""
    try:
        lines = layout.serving_log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [_parse(line, layout.serving_log) for line in lines if line.strip()]


def resolve(layout: Layout) -> Serving:
    """The serving triple, checked to name files that exist: what a reader loads, all three from one read."""
    current = read(layout)
    if current is None:
        raise DataError(f"{layout.serving}: nothing serves yet (run `semid train_ranker`: its first promotion "
                        f"switches the pointer)")
    missing = [str(p) for p in current.files(layout.root) if not p.exists()]
    if missing:
        raise DataError(f"{layout.serving}: names {', '.join(missing)}, which do not exist")
    return current


def before(layout: Layout, as_of: str) -> Serving | None:
    """What served before the switches made as of `as_of`: a day run again (after a crash between the switch and
    the end of its stage, or by `dvc repro --force`) decides against it, as its first run did. A pointer pinned
    by a rollback is what served."""
    current = read(layout)
    if current is None or current.pinned or current.as_of < as_of:
        return current
    earlier = [s for s in history(layout) if s.as_of < as_of]
    return earlier[-1] if earlier else None


def switch(layout: Layout, as_of: str, codebook_version: str | None, champion: str) -> Serving:
    """Point serving at a new triple (appended to the log first, then one rename of models/serving.json). Running
    a day's switch again changes nothing: a log line that a killed run wrote without moving the pointer is
    replaced, and a pointer already at this day's triple stays."""
    current = read(layout)
    if current is not None and (current.as_of, current.codebook_version, current.champion) == (
            as_of, codebook_version, champion):
        return current
    log = [s for s in history(layout) if current is None or s.seq <= current.seq or s.as_of < as_of]
    new = triple(layout, as_of, codebook_version, champion, seq=len(log) + 1)
    missing = [str(p) for p in new.files(layout.root) if not p.exists()]
    if missing:
        raise DataError(f"cannot switch serving to {champion} under codebook {codebook_version}: "
                        f"{', '.join(missing)} missing")
    lines = [json.dumps(dataclasses.asdict(s)) for s in (*log, new)]
    write_text("\n".join(lines) + "\n", layout.serving_log)
    write_json(dataclasses.asdict(new), layout.serving)
    return new


def rollback(layout: Layout, to_seq: int | None = None) -> Serving:
    """Point serving back at switch `to_seq` (default: the one before the serving one) and pin it there."""
    current, log = read(layout), history(layout)
    if current is None or not log:
        raise DataError(f"{layout.serving}: nothing serves yet, nothing to roll back")
    target_seq = current.seq - 1 if to_seq is None else to_seq
    if not 1 <= target_seq <= len(log) or target_seq == current.seq:
        raise DataError(f"{layout.serving_log}: no earlier switch {target_seq} to roll back to (serving switch "
                        f"{current.seq}; the log holds 1..{len(log)})")
    target = dataclasses.replace(log[target_seq - 1], pinned=True)
    missing = [str(p) for p in target.files(layout.root) if not p.exists()]
    if missing:
        raise DataError(f"cannot roll back to switch {target_seq}: {', '.join(missing)} no longer exist")
    write_json(dataclasses.asdict(target), layout.serving)
    return target


def unpin(layout: Layout) -> Serving:
    """Let the next promoted challenger switch serving again after a rollback."""
    current = read(layout)
    if current is None:
        raise DataError(f"{layout.serving}: nothing serves yet")
    current = dataclasses.replace(current, pinned=False)
    write_json(dataclasses.asdict(current), layout.serving)
    return current
