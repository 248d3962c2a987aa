"""Models of the tasks app (built in its own issue)."""
