"""Models of the chat app (built in its own issue)."""
