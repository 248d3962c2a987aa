"""Drop foreign keys' own indexes where a composite index led by the same column serves every
lookup by it (tests/test_indexes.py): each costs a write on every insert and buys nothing. Only
the index is dropped: Django's AlterField would also drop and re-add the foreign key constraint,
validating the whole table under a lock."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0004_idempotencyrecord"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "billing_entry_account_id_01812d7d"',
                    reverse_sql='CREATE INDEX "billing_entry_account_id_01812d7d" ON "billing_entry" ("account_id")',
                ),
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "billing_idempotencyrecord_user_id_26b848d4"',
                    reverse_sql='CREATE INDEX "billing_idempotencyrecord_user_id_26b848d4" ON "billing_idempotencyrecord" ("user_id")',
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="entry",
                    name="account",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="entries",
                        to="billing.account",
                    ),
                ),
                migrations.AlterField(
                    model_name="idempotencyrecord",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
        ),
    ]
