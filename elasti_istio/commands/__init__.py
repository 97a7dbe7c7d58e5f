"""Everyday commands: ``status``, ``wake``, ``sleep``."""
