from django.db import migrations, models


def backfill(apps, schema_editor):  # noqa: ANN001, ARG001 - migration signature
    """Tasks that succeeded before the basis was stored: what they asked for (their
    num_outputs, else 1), at least what they delivered. Mirrors outputs_requested()."""
    Task = apps.get_model("tasks", "Task")
    for task in Task.objects.filter(status="SUCCESS", outputs_requested=0).iterator():
        params = task.params if isinstance(task.params, dict) else {}
        count = params.get("num_outputs", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
            count = 1
        task.outputs_requested = max(count, len(task.results or []))
        task.save(update_fields=["outputs_requested"])


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0003_expiry_index_success_only"),
    ]

    operations = [
        migrations.AddField(
            model_name="task",
            name="outputs_requested",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
