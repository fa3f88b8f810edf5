"""Test-only helpers importable by the server under test (via --architecture settings)."""
