"""The outbox of submitted tasks: ``Task.queued_at``. Tasks stored before it were queued by the
request that made them, so they count as queued when it was made."""

from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0010_single_tasks"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="task",
            name="queued_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunSQL(
            "UPDATE ai_task SET queued_at = created_at", reverse_sql=migrations.RunSQL.noop
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(
                    ("queued_at", None), ("runtime", "async"), ("status", "WAITING")
                ),
                fields=["created_at"],
                name="task_outbox",
            ),
        ),
    ]
