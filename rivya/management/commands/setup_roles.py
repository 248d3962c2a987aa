"""Create or update the support staff's groups (issue 15). Safe to run again: each group's
permissions are set to exactly the list below (a permission removed here is removed there).

- Support: sees everything (the view permission of every Rivya model, users included); may
  re-check, cancel and resubmit tasks (the user pays), and resend webhook messages.
- Billing: all of Support, and marks failed with a refund, refunds, adjusts credits (the
  "Adjust credits" form asks for ``billing.add_ledgertransaction``) and resubmits at our cost.

Ledger entries and holds stay read-only to everyone: the admin refuses their change and delete
whatever the permissions say.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Q

RIVYA_APPS = ("rivya", "billing", "tasks", "chat", "notifications")
SUPPORT = [
    "tasks.recheck_task",
    "tasks.cancel_task",
    "tasks.resubmit_task",
    "notifications.resend_webhookmessage",
]
BILLING = [
    *SUPPORT,
    "tasks.refund_task",
    "tasks.resubmit_task_free",
    "billing.add_ledgertransaction",
]


def _permissions(names: list[str]) -> list[Permission]:
    found = []
    for name in names:
        app_label, codename = name.split(".")
        perm = Permission.objects.filter(
            content_type__app_label=app_label, codename=codename
        ).first()
        if perm is None:
            raise CommandError(f"Permission {name} does not exist: run migrate first.")
        found.append(perm)
    return found


def _view_all() -> list[Permission]:
    return list(
        Permission.objects.filter(
            Q(content_type__app_label__in=RIVYA_APPS), codename__startswith="view_"
        )
    )


class Command(BaseCommand):
    help = "Create or update the Support and Billing staff groups and their permissions."

    def handle(self, *args: Any, **options: Any) -> None:
        view = _view_all()
        with transaction.atomic():
            for name, extra in (("Support", SUPPORT), ("Billing", BILLING)):
                group, created = Group.objects.get_or_create(name=name)
                perms = {p.pk: p for p in [*view, *_permissions(extra)]}
                group.permissions.set(perms.values())
                self.stdout.write(
                    f"{'Created' if created else 'Updated'} group {name}: {len(perms)} permissions."
                )
