"""Declarative compression recipes."""
