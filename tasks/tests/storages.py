"""A storage for fault injection in tests (not a test module): the filesystem storage, failing
to save its second file, as a cloud bucket may in the middle of a dataset."""

from __future__ import annotations

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
