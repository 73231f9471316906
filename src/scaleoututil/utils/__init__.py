"""Compatibility utilities for Scaleout Edge compute packages (`scaleoututil.utils`)."""
