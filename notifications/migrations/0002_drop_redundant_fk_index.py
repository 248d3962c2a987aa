"""Drop foreign keys' own indexes where a composite index led by the same column serves every
lookup by it (tests/test_indexes.py): each costs a write on every insert and buys nothing. Only
the index is dropped: Django's AlterField would also drop and re-add the foreign key constraint,
validating the whole table under a lock."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("notifications", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "notifications_notification_user_id_b5e8c0ff"',
                    reverse_sql='CREATE INDEX "notifications_notification_user_id_b5e8c0ff" ON "notifications_notification" ("user_id")',
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="notification",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="notifications",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
        ),
    ]
