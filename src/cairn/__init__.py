"""Cairn."""
