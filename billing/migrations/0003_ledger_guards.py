from __future__ import annotations

from django.db import migrations

from billing.migrations_sql import install, uninstall


class Migration(migrations.Migration):
    dependencies = [("billing", "0002_initial")]

    operations = [migrations.RunPython(install, uninstall)]
