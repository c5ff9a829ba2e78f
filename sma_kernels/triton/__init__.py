"""Triton GPU backend (mask scores, selection, masked attention)."""

UNAVAILABLE: str | None = "the Triton backend is not built yet"
