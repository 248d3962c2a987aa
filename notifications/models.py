"""Models of the notifications app (built in its own issue)."""
