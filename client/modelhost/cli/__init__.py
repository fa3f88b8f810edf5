"""The `modelhost` command."""
