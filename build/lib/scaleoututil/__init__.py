"""Compatibility helpers for Scaleout Edge compute packages (`scaleoututil.helpers`)."""
