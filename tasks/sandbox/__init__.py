"""The sandbox upstream (docs/sandbox.md): a standalone HTTP server playing an async AI provider
(jobs) and a language-model vendor (streamed chat completions).

Run it with ``python -m tasks.sandbox --port 8765``. It must not import Django or Rivya's apps.
"""
