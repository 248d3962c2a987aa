"""The storage sweep: files no row references (a rolled-back multipart submit, a worker killed
between storing results and committing the outcome) are deleted once older than the minimum
age; referenced files never are, however old. Real filesystem storage, files aged with utime."""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.utils import timezone
from PIL import Image

from rivya.errors import CapacityExceeded
from tasks import services
from tasks.models import Task, Upload
from tasks.tasks import sweep_storage

S = Task.Status
HOUR = timedelta(hours=1)
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("catalog", "queued")]


# --- helpers --------------------------------------------------------------------------------


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (30, 160, 90)).save(out, "PNG")
    return out.getvalue()


def stored() -> list[str]:
    """Every file in the storage, as storage names."""
    root = Path(django_settings.MEDIA_ROOT)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def age(*names: str, hours: float = 2) -> None:
    """Make files look ``hours`` old (every stored file if no name is given)."""
    when = time.time() - hours * 3600
    for name in names or stored():
        os.utime(default_storage.path(name), (when, when))


def exists(name: str) -> bool:
    return (Path(django_settings.MEDIA_ROOT) / name).exists()


def succeeded_with_upload(user: Any) -> Task:
    """A multipart submit (one reference file) run to SUCCESS against the sandbox."""
    outcome = services.task_submit(
        user=user,
        model_slug="sandbox-image",
        prompt="a lighthouse at dusk",
        params={"num_outputs": 2},
        files=[SimpleUploadedFile("ref.png", png(), content_type="image/png")],
    )
    assert outcome.accepted
    services.task_send_upstream(task_id=outcome.task.pk)
    services.task_refresh(task_id=outcome.task.pk)
    task = Task.objects.get(pk=outcome.task.pk)
    assert task.status == S.SUCCESS
    assert len(task.results) == 2
    return task


def killed_attempt(task: Task) -> str:
    """What a worker killed after storing a result but before committing leaves behind."""
    return default_storage.save(f"results/{task.pk}/0123456789ab/0.png", ContentFile(png()))


# --- orphans are deleted once old enough ----------------------------------------------------


def test_upload_of_a_rolled_back_submit_is_removed_after_min_age_not_before(
    funded: Any, settings: Any, tmp_path: Path
) -> None:
    # given: a multipart submit whose transaction rolls back after its upload was written
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.TASK_MAX_RUNNING_PER_USER = 0
    user = funded(10)
    with pytest.raises(CapacityExceeded):
        services.task_submit(
            user=user,
            model_slug="sandbox-image",
            prompt="a fox",
            files=[SimpleUploadedFile("ref.png", png(), content_type="image/png")],
        )
    assert not Upload.objects.exists()
    assert not Task.objects.exists()
    [orphan] = stored()
    assert orphan.startswith(f"uploads/{user.pk}/")

    # when: swept while the file is younger than the minimum age
    early = services.storage_sweep(min_age=HOUR)

    # then: it is left for a later sweep
    assert (early.scanned, early.orphaned, early.recent, early.deleted) == (1, 0, 1, 0)
    assert exists(orphan)

    # when: swept once it is older than the minimum age
    age(orphan)
    late = services.storage_sweep(min_age=HOUR)

    # then: the file and its upload directory are gone, the user's directory stays
    assert (late.orphaned, late.deleted, late.recent) == (1, 1, 0)
    assert late.names == [orphan]
    assert late.bytes == len(png())
    assert stored() == []
    assert not exists(str(Path(orphan).parent))
    assert exists(f"uploads/{user.pk}")


def test_referenced_upload_and_results_are_never_removed_however_old(
    funded: Any, sandbox: Any
) -> None:
    # given: a finished task with its reference upload and two results, all a year old
    task = succeeded_with_upload(funded(10))
    upload = Upload.objects.get()
    referenced = sorted([upload.file.name] + [r["name"] for r in task.results])
    assert stored() == referenced
    age(hours=24 * 365)

    # when
    report = services.storage_sweep(min_age=HOUR)

    # then
    assert (report.scanned, report.orphaned, report.deleted, report.recent) == (3, 0, 0, 0)
    assert stored() == referenced


def test_attempt_left_by_a_killed_worker_is_removed_when_another_attempt_succeeded(
    funded: Any, sandbox: Any
) -> None:
    # given: a task that succeeded with one attempt, and the files of another attempt that
    # was stored but never committed
    task = succeeded_with_upload(funded(10))
    orphan = killed_attempt(task)
    kept = sorted(set(stored()) - {orphan})
    age()

    # when
    report = services.storage_sweep(min_age=HOUR)

    # then: only the dead attempt (and its directory) is gone
    assert (report.scanned, report.orphaned, report.deleted) == (4, 1, 1)
    assert report.names == [orphan]
    assert stored() == kept
    assert not exists(str(Path(orphan).parent))
    assert exists(f"results/{task.pk}")


def test_attempt_of_a_task_still_generating_keeps_the_task_directory(
    funded: Any, settings: Any, tmp_path: Path
) -> None:
    # given: an unfinished task whose earlier attempt left a file (a new attempt may be
    # storing into the task directory right now)
    settings.MEDIA_ROOT = str(tmp_path / "media")
    outcome = services.task_submit(user=funded(10), model_slug="sandbox-image", prompt="a fox")
    orphan = killed_attempt(outcome.task)
    age(orphan)

    # when
    report = services.storage_sweep(min_age=HOUR)

    # then
    assert (report.orphaned, report.deleted) == (1, 1)
    assert not exists(str(Path(orphan).parent))
    assert exists(f"results/{outcome.task.pk}")


def test_results_of_unknown_tasks_and_of_expired_results_are_orphans(
    funded: Any, sandbox: Any
) -> None:
    # given: a result directory whose task does not exist, and the files of a task whose
    # results were marked expired (a delete the storage refused, say)
    unknown = f"results/{uuid.uuid4()}/0123456789ab/0.png"
    default_storage.save(unknown, ContentFile(b"x"))
    task = succeeded_with_upload(funded(10))
    Task.objects.filter(pk=task.pk).update(results_expired_at=timezone.now())
    upload_name = Upload.objects.get().file.name
    age()

    # when
    report = services.storage_sweep(min_age=HOUR)

    # then: only the (still referenced) upload is left, and no empty result directory
    assert (report.orphaned, report.deleted) == (3, 3)
    assert sorted(report.names) == sorted([unknown] + [r["name"] for r in task.results])
    assert stored() == [upload_name]
    assert list((Path(django_settings.MEDIA_ROOT) / "results").iterdir()) == []


def test_files_outside_the_layout_are_left_alone(user: Any, settings: Any, tmp_path: Path) -> None:
    # given: old files in places the application never writes to
    settings.MEDIA_ROOT = str(tmp_path / "media")
    strays = [
        default_storage.save(name, ContentFile(b"x"))
        for name in (
            "results/README.txt",
            "results/not-a-task/0.png",
            f"uploads/{user.pk}/not-an-upload/file",
            f"uploads/{user.pk}/file",
            "uploads/notes.txt",
            "elsewhere/file",
        )
    ]
    age()

    # when
    report = services.storage_sweep(min_age=HOUR)

    # then
    assert (report.scanned, report.skipped, report.deleted) == (5, 5, 0)
    assert stored() == sorted(strays)


def test_dry_run_deletes_nothing_but_reports(user: Any, settings: Any, tmp_path: Path) -> None:
    # given: two old orphans (an upload without a row, a result without a task) and a new one
    settings.MEDIA_ROOT = str(tmp_path / "media")
    old = [
        default_storage.save(f"uploads/{user.pk}/{uuid.uuid4()}/file", ContentFile(b"12345")),
        default_storage.save(f"results/{uuid.uuid4()}/0123456789ab/0.png", ContentFile(b"123")),
    ]
    age(*old)
    default_storage.save(f"uploads/{user.pk}/{uuid.uuid4()}/file", ContentFile(b"new"))
    before = stored()

    # when
    report = services.storage_sweep(min_age=HOUR, dry_run=True)

    # then
    assert report.dry_run
    assert (report.scanned, report.orphaned, report.recent, report.deleted) == (3, 2, 1, 0)
    assert report.bytes == 8
    assert sorted(report.names) == sorted(old)
    assert stored() == before


def test_references_are_read_once_per_batch_of_directories(
    user: Any, settings: Any, tmp_path: Path, django_assert_max_num_queries: Any
) -> None:
    # given: many task and upload directories
    settings.MEDIA_ROOT = str(tmp_path / "media")
    for _ in range(30):
        default_storage.save(f"results/{uuid.uuid4()}/0123456789ab/0.png", ContentFile(b"x"))
        default_storage.save(f"uploads/{user.pk}/{uuid.uuid4()}/file", ContentFile(b"x"))

    # when / then: one query for the task directories, one for the user's upload directories
    with django_assert_max_num_queries(2):
        report = services.storage_sweep(min_age=HOUR)
    assert (report.scanned, report.recent) == (60, 60)


def test_negative_min_age_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        services.storage_sweep(min_age=-HOUR)


# --- command, beat and Celery task ----------------------------------------------------------


def test_command_prints_what_it_deletes_and_a_summary(
    user: Any, settings: Any, tmp_path: Path
) -> None:
    # given: one old orphaned upload
    settings.MEDIA_ROOT = str(tmp_path / "media")
    orphan = default_storage.save(f"uploads/{user.pk}/{uuid.uuid4()}/file", ContentFile(b"abc"))
    age(orphan, hours=3)

    # when: a dry run, then the real thing
    dry = io.StringIO()
    call_command("sweep_storage", "--dry-run", "--min-age", "3600", stdout=dry)
    real = io.StringIO()
    call_command("sweep_storage", "--min-age", "3600", stdout=real)

    # then
    assert dry.getvalue().splitlines() == [
        f"would delete {orphan}",
        "sweep_storage (dry run): 1 scanned, 1 orphaned older than 3600 s, 0 deleted "
        "(3 bytes), 0 too recent, 0 skipped, 0 failed.",
    ]
    assert real.getvalue().splitlines() == [
        f"deleted {orphan}",
        "sweep_storage: 1 scanned, 1 orphaned older than 3600 s, 1 deleted (3 bytes), "
        "0 too recent, 0 skipped, 0 failed.",
    ]
    assert stored() == []


def test_command_defaults_to_the_setting(user: Any, settings: Any, tmp_path: Path) -> None:
    # given: an orphan 3 hours old, and a minimum age of 4 hours
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.STORAGE_SWEEP_MIN_AGE = 4 * 3600
    orphan = default_storage.save(f"uploads/{user.pk}/{uuid.uuid4()}/file", ContentFile(b"abc"))
    age(orphan, hours=3)

    # when
    out = io.StringIO()
    call_command("sweep_storage", stdout=out)

    # then
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith("0 deleted (0 bytes), 1 too recent, 0 skipped, 0 failed.")
    )
    assert stored() == [orphan]


def test_beat_runs_the_sweep_hourly() -> None:
    assert django_settings.CELERY_BEAT_SCHEDULE["sweep-storage"] == {
        "task": "tasks.sweep_storage",
        "schedule": 3600.0,
    }
    assert sweep_storage.name == "tasks.sweep_storage"


def test_celery_task_sweeps_with_the_setting_and_logs_only_when_it_deleted(
    user: Any, settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given: orphans 2 hours old and 30 minutes old, with a one-hour minimum age
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.STORAGE_SWEEP_MIN_AGE = 3600
    old = default_storage.save(f"uploads/{user.pk}/{uuid.uuid4()}/file", ContentFile(b"abc"))
    young = default_storage.save(f"uploads/{user.pk}/{uuid.uuid4()}/file", ContentFile(b"abc"))
    age(old, hours=2)
    age(young, hours=0.5)
    caplog.set_level(logging.INFO, logger="tasks.tasks")

    # when / then: the first run deletes the old one and says so
    assert sweep_storage() == 1
    assert stored() == [young]
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "deleted 1 orphaned file(s)" in caplog.records[0].getMessage()

    # when / then: a run with nothing to delete is quiet
    caplog.clear()
    assert sweep_storage() == 0
    assert caplog.records == []


def test_datasets_no_task_uses_are_removed_the_one_a_task_uses_is_kept(
    funded: Any, settings: Any, tmp_path: Path
) -> None:
    from tasks.media import MediaInfo
    from tasks.models import Dataset
    from tasks.single.datasets import CheckedFile, dataset_path, dataset_store
    from tasks.single.services import single_start

    # given, all a day old: the dataset of a recorded single task; a COMPLETED dataset whose
    # process died before its task was recorded; and the file a process killed mid-upload left
    # for a PENDING dataset (no rows yet)
    settings.MEDIA_ROOT = str(tmp_path / "media")
    user = funded(10)
    used = single_start(
        user=user,
        single_type="completion",
        data={"prompt": "what is this?"},
        files=[SimpleUploadedFile("a.png", png(), "image/png")],
    ).task.dataset
    info = MediaInfo(mime="image/png", kind="image", width=16, height=12, duration_ms=None)
    unused = dataset_store(
        user=user,
        purpose="completion",
        files=[CheckedFile(SimpleUploadedFile("b.png", png()), "b.png", info, len(png()))],
    )
    pending = Dataset.objects.create(user=user, purpose="completion", file_count=2)
    left = default_storage.save(
        dataset_path(user_id=user.pk, dataset_id=pending.pk, position=0), ContentFile(png())
    )
    age(hours=30)

    # when: swept
    report = services.storage_sweep(min_age=HOUR)

    # then: only the files of the dataset a task uses remain
    assert sorted(report.names) == sorted([left, unused.files.get().file.name])
    assert stored() == [used.files.get().file.name]
