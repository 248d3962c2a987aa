"""The sandbox upstream (docs/sandbox.md): a standalone HTTP server playing an async AI provider.

Run it with ``python -m tasks.sandbox --port 8765``. It must not import Django or Rivya's apps.
"""
