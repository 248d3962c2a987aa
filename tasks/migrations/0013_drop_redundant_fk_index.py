"""Drop foreign keys' own indexes where a composite index led by the same column serves every
lookup by it (tests/test_indexes.py): each costs a write on every insert and buys nothing. Only
the index is dropped: Django's AlterField would also drop and re-add the foreign key constraint,
validating the whole table under a lock."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0012_accept_refused_function"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "tasks_dataset_user_id_5b709404"',
                    reverse_sql='CREATE INDEX "tasks_dataset_user_id_5b709404" ON "tasks_dataset" ("user_id")',
                ),
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "tasks_datasetfile_dataset_id_1f1c59c2"',
                    reverse_sql='CREATE INDEX "tasks_datasetfile_dataset_id_1f1c59c2" ON "tasks_datasetfile" ("dataset_id")',
                ),
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "tasks_taskevent_task_id_bfe419b4"',
                    reverse_sql='CREATE INDEX "tasks_taskevent_task_id_bfe419b4" ON "tasks_taskevent" ("task_id")',
                ),
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "tasks_upload_user_id_724ad5fa"',
                    reverse_sql='CREATE INDEX "tasks_upload_user_id_724ad5fa" ON "tasks_upload" ("user_id")',
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="dataset",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="datasets",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                migrations.AlterField(
                    model_name="datasetfile",
                    name="dataset",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="files",
                        to="tasks.dataset",
                    ),
                ),
                migrations.AlterField(
                    model_name="taskevent",
                    name="task",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="events",
                        to="tasks.task",
                    ),
                ),
                migrations.AlterField(
                    model_name="upload",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="uploads",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
        ),
    ]
