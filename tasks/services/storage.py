"""Storage sweep: files nothing references (lifecycle "Known limits", issue 13 point 10).

Three paths leave files behind that no row refers to: a multipart submit whose transaction rolls
back after ``upload_create`` wrote its file, a worker killed between storing an attempt's
result files and committing the outcome, and a web process killed while it stored a single
task's dataset (before its ``DatasetFile`` rows). The sweep walks ``uploads/``, ``results/``
and ``datasets/`` through the Django storage API only (``listdir``, ``get_modified_time``,
``size``, ``delete``), so it works on the filesystem storage and on S3 through django-storages
alike.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.core.files.storage import default_storage
from django.utils import timezone

from tasks.models import DatasetFile, Task, Upload

RESULTS = "results"
UPLOADS = "uploads"
DATASETS = "datasets"
BATCH = 200  # directories whose references are read in one query
NAMES_LIMIT = 1000  # orphaned names kept in the report


@dataclass
class SweepReport:
    """What one sweep found. ``orphaned`` files are unreferenced and older than the minimum
    age; ``names`` and ``bytes`` are those deleted (in a dry run: those that would be)."""

    dry_run: bool
    scanned: int = 0
    orphaned: int = 0
    deleted: int = 0
    bytes: int = 0
    recent: int = 0  # unreferenced but younger than the minimum age: left for a later sweep
    skipped: int = 0  # outside the layout we write (never deleted)
    failed: int = 0  # the storage refused to delete (or to describe) the file
    names: list[str] = field(default_factory=list)  # the first NAMES_LIMIT of them

    @property
    def names_left_off(self) -> int:
        return (self.orphaned if self.dry_run else self.deleted) - len(self.names)


def storage_sweep(
    *, min_age: timedelta, dry_run: bool = False, now: datetime | None = None
) -> SweepReport:
    """Delete stored files under ``results/``, ``uploads/`` and ``datasets/`` that no row
    references and that were last modified at least ``min_age`` before ``now`` (default: the
    current time).

    Referenced, and so never deleted however old: the ``file`` of an ``Upload`` row (looked up
    by the id in ``uploads/<user>/<upload id>/``), the ``file`` of each ``DatasetFile`` of a
    dataset (``datasets/<user>/<dataset id>/``), and each ``results[*].name`` of a task whose
    ``results_expired_at`` is null (looked up by the id in ``results/<task id>/``; a task
    directory whose task does not exist holds only orphans). Files younger than ``min_age``
    are never touched: a submit or an outcome may be about to commit the row that refers to
    them, so ``min_age`` must be far longer than any transaction. Files outside that layout
    are counted as ``skipped`` and left alone.

    With ``dry_run`` nothing is deleted; the report says what would be. On the filesystem
    storage, directories the sweep emptied are removed (never a user's ``uploads/<user>/``
    directory, nor the directory of an unfinished task: a new file may be on its way there).
    Safe to run twice or concurrently (deleting a missing file is a no-op). Raises ValueError
    for a negative ``min_age``.
    """
    if min_age < timedelta(0):
        raise ValueError("min_age must not be negative")
    sweep = _Sweep(cutoff=(now or timezone.now()) - min_age, report=SweepReport(dry_run=dry_run))
    sweep.results()
    sweep.uploads()
    sweep.datasets()
    return sweep.report


@dataclass
class _Sweep:
    cutoff: datetime
    report: SweepReport

    # --- results/<task id>/<attempt>/<n>.<ext> --------------------------------------------

    def results(self) -> None:
        dirs, files = _listdir(RESULTS)
        self._skip(f"{RESULTS}/{f}" for f in files)
        for chunk in _chunks(dirs):
            ids = {d: _uuid(d) for d in chunk}
            known = {
                pk: (status, results, expired)
                for pk, status, results, expired in Task.objects.filter(
                    pk__in=[i for i in ids.values() if i is not None]
                ).values_list("pk", "status", "results", "results_expired_at")
            }
            for directory, task_id in ids.items():
                prefix = f"{RESULTS}/{directory}"
                if task_id is None:
                    self._skip(_walk(prefix))
                    continue
                status, results, expired = known.get(task_id, (None, [], None))
                referenced = set() if expired else _result_names(results)
                # An unfinished task may be storing a new attempt here right now.
                keep_dir = status in Task.UNFINISHED
                self._sweep_dir(prefix, referenced, remove_root=not keep_dir)

    # --- uploads/<user>/<upload id>/file ---------------------------------------------------

    def uploads(self) -> None:
        user_dirs, files = _listdir(UPLOADS)
        self._skip(f"{UPLOADS}/{f}" for f in files)
        for user_dir in user_dirs:
            base = f"{UPLOADS}/{user_dir}"
            dirs, files = _listdir(base)
            self._skip(f"{base}/{f}" for f in files)
            for chunk in _chunks(dirs):
                ids = {d: _uuid(d) for d in chunk}
                known = dict(
                    Upload.objects.filter(
                        pk__in=[i for i in ids.values() if i is not None]
                    ).values_list("pk", "file")
                )
                for directory, upload_id in ids.items():
                    prefix = f"{base}/{directory}"
                    if upload_id is None:
                        self._skip(_walk(prefix))
                        continue
                    name = known.get(upload_id)
                    self._sweep_dir(prefix, {name} if name else set(), remove_root=True)

    # --- datasets/<user>/<dataset id>/<n> -------------------------------------------------

    def datasets(self) -> None:
        """A dataset's files are referenced by its ``DatasetFile`` rows, written once all are
        stored, while a task uses the dataset. A process killed mid-upload leaves files without
        rows (the dataset PENDING); one killed before the task was recorded, a dataset that no
        task uses."""
        user_dirs, files = _listdir(DATASETS)
        self._skip(f"{DATASETS}/{f}" for f in files)
        for user_dir in user_dirs:
            base = f"{DATASETS}/{user_dir}"
            dirs, files = _listdir(base)
            self._skip(f"{base}/{f}" for f in files)
            for chunk in _chunks(dirs):
                ids = {d: _uuid(d) for d in chunk}
                referenced: dict[uuid.UUID, set[str]] = {}
                for dataset_id, name in (
                    DatasetFile.objects.filter(
                        dataset_id__in=[i for i in ids.values() if i is not None],
                        dataset__tasks__isnull=False,
                    )
                    .values_list("dataset_id", "file")
                    .distinct()
                ):
                    referenced.setdefault(dataset_id, set()).add(name)
                for directory, dataset_id in ids.items():
                    prefix = f"{base}/{directory}"
                    if dataset_id is None:
                        self._skip(_walk(prefix))
                        continue
                    self._sweep_dir(prefix, referenced.get(dataset_id, set()), remove_root=True)

    # --- common ----------------------------------------------------------------------------

    def _skip(self, names: Iterable[str]) -> None:
        for _ in names:
            self.report.scanned += 1
            self.report.skipped += 1

    def _sweep_dir(self, prefix: str, referenced: set[str], *, remove_root: bool) -> None:
        deleted: list[str] = []
        for name in _walk(prefix):
            self.report.scanned += 1
            # References first (one query per batch of directories); then the age, which on
            # S3 costs a request per file and so is asked only of unreferenced files.
            if name in referenced:
                continue
            try:
                modified = default_storage.get_modified_time(name)
                if timezone.is_naive(modified):
                    modified = timezone.make_aware(modified)
                if modified > self.cutoff:
                    self.report.recent += 1
                    continue
                size = default_storage.size(name)
            except FileNotFoundError:
                continue  # deleted meanwhile (result expiry, another sweep)
            except OSError:
                self.report.failed += 1
                continue
            self.report.orphaned += 1
            if not self.report.dry_run:
                try:
                    default_storage.delete(name)
                except OSError:
                    self.report.failed += 1
                    continue
                self.report.deleted += 1
                deleted.append(name)
            self.report.bytes += size
            if len(self.report.names) < NAMES_LIMIT:
                self.report.names.append(name)
        if deleted:
            _remove_empty_dirs(prefix, deleted, remove_root=remove_root)


def _listdir(path: str) -> tuple[list[str], list[str]]:
    try:
        dirs, files = default_storage.listdir(path)
    except FileNotFoundError:  # the filesystem storage before anything was stored there
        return [], []
    return sorted(dirs), sorted(files)


def _walk(prefix: str) -> Iterator[str]:
    dirs, files = _listdir(prefix)
    for name in files:
        yield f"{prefix}/{name}"
    for directory in dirs:
        yield from _walk(f"{prefix}/{directory}")


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _result_names(results: object) -> set[str]:
    if not isinstance(results, list):
        return set()
    return {r["name"] for r in results if isinstance(r, dict) and isinstance(r.get("name"), str)}


def _remove_empty_dirs(prefix: str, deleted: list[str], *, remove_root: bool) -> None:
    """Filesystem storage only: remove the directories under ``prefix`` (and ``prefix`` itself
    if ``remove_root``) that deleting ``deleted`` left empty. Object stores have no
    directories (``path()`` raises NotImplementedError)."""
    try:
        root = Path(default_storage.path(prefix))
        parents = {Path(default_storage.path(name)).parent for name in deleted}
    except NotImplementedError:
        return
    candidates: set[Path] = set()
    for parent in parents:
        while parent != root and root in parent.parents:
            candidates.add(parent)
            parent = parent.parent
    if remove_root:
        candidates.add(root)
    # Deepest first, so a parent is tried after its children; rmdir refuses a non-empty one.
    for directory in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()
