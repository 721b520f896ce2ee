"""Numpy math on weights and statistics; no graph or runtime code here."""
