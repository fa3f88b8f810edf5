"""Tests of the container image, run by a real Docker daemon (see docker.py)."""
