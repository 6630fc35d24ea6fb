"""Slow, obviously-correct references used only by tests."""
