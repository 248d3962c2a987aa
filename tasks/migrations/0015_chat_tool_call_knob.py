"""The sandbox chat models' ``sandbox_tool_call`` knob (chat/tools.py) on catalogs seeded
before it: added where missing, as ``seed_catalog`` writes it for new ones."""

from django.db import migrations

KNOB = {
    "type": ["object", "array"],
    "description": 'call a tool: {"tool": "generate_image", "arguments": {"prompt": "a red '
    'fox"}}, or a list of such calls',
}


def add_knob(apps, schema_editor):  # type: ignore[no-untyped-def]
    AIModel = apps.get_model("tasks", "AIModel")  # noqa: N806
    for model in AIModel.objects.filter(category="chat", provider="sandbox"):
        properties = model.params_schema.get("properties")
        if isinstance(properties, dict) and "sandbox_tool_call" not in properties:
            properties["sandbox_tool_call"] = KNOB
            model.save(update_fields=["params_schema"])


def remove_knob(apps, schema_editor):  # type: ignore[no-untyped-def]
    AIModel = apps.get_model("tasks", "AIModel")  # noqa: N806
    for model in AIModel.objects.filter(category="chat", provider="sandbox"):
        properties = model.params_schema.get("properties")
        if isinstance(properties, dict) and properties.pop("sandbox_tool_call", None):
            model.save(update_fields=["params_schema"])


class Migration(migrations.Migration):
    dependencies = [("tasks", "0014_task_webhook")]
    operations = [migrations.RunPython(add_knob, remove_knob)]
