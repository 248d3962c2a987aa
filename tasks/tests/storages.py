"""Storages for fault injection in tests (not a test module): the filesystem storage, failing
to save its second file, as a cloud bucket may in the middle of a dataset."""

from __future__ import annotations

import time
from typing import Any

from django.core.files.storage import FileSystemStorage


class FailOnSecondSave(FileSystemStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saves = 0

    def _save(self, name: str, content: Any) -> str:
        self.saves += 1
        if self.saves == 2:
            raise OSError("simulated storage outage")
        return super()._save(name, content)


class SlowSave(FileSystemStorage):
    """The filesystem storage, taking ``delay`` seconds to save each file (a slow bucket)."""

    def __init__(self, *args: Any, delay: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay

    def _save(self, name: str, content: Any) -> str:
        time.sleep(self.delay)
        return super()._save(name, content)
