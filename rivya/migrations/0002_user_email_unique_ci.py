import django.db.models.functions.text
from django.db import migrations, models
from django.db.models import Count
from django.db.models.functions import Lower


def refuse_shared_emails(apps, schema_editor):
    """Name the accounts that already share an email rather than fail on the index alone:
    which one keeps it is the operator's call (each got a signup grant)."""
    User = apps.get_model("rivya", "User")
    shared = (
        User.objects.exclude(email="")
        .annotate(key=Lower("email"))
        .values("key")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .values_list("key", flat=True)
    )
    groups = [
        f"{key}: "
        + ", ".join(
            User.objects.annotate(key=Lower("email"))
            .filter(key=key)
            .order_by("id")
            .values_list("username", flat=True)
        )
        for key in shared
    ]
    if groups:
        raise RuntimeError(
            "These accounts share an email (case-insensitively); emails must be unique now. "
            "Change or clear the email of all but one in each group, then migrate again: "
            + "; ".join(groups)
        )


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("rivya", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(refuse_shared_emails, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="user",
            constraint=models.UniqueConstraint(
                django.db.models.functions.text.Lower("email"),
                condition=models.Q(("email", ""), _negated=True),
                name="user_email_unique_ci",
                violation_error_message="An account with this email already exists.",
            ),
        ),
    ]
