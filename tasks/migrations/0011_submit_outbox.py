"""The outbox of submitted tasks (docs/submit.md). Tasks stored before it were queued by the
requests that made them: none is in it."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tasks', '0010_single_tasks'),
    ]

    operations = [
        migrations.CreateModel(
            name='SubmitOutbox',
            fields=[
                ('task', models.OneToOneField(on_delete=django.db.models.deletion.PROTECT, primary_key=True, related_name='+', serialize=False, to='tasks.task')),
                ('created_at', models.DateTimeField(auto_now_add=True, db_index=True)),
            ],
        ),
    ]
