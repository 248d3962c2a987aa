"""``rivya_accept_refused(reason)``: how the one-statement accept of a submit
(``tasks.services.accept``) refuses. It raises SQLSTATE RV001 with ``reason`` as the message,
which undoes the whole statement. PostgreSQL only: elsewhere submits take the ORM path."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION rivya_accept_refused(reason text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'RV001', MESSAGE = reason;
END
$$
"""
DROP = "DROP FUNCTION IF EXISTS rivya_accept_refused(text)"


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):

    dependencies = [
        ("tasks", "0011_submit_outbox"),
    ]

    operations = [migrations.RunPython(create, drop)]
