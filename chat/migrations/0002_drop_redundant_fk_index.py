"""Drop foreign keys' own indexes where a composite index led by the same column serves every
lookup by it (tests/test_indexes.py): each costs a write on every insert and buys nothing. Only
the index is dropped: Django's AlterField would also drop and re-add the foreign key constraint,
validating the whole table under a lock."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "chat_message_session_id_9abc6edf"',
                    reverse_sql='CREATE INDEX "chat_message_session_id_9abc6edf" ON "chat_message" ("session_id")',
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="chatmessage",
                    name="session",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="messages",
                        to="chat.chatsession",
                    ),
                ),
            ],
        ),
    ]
