"""The library's version (also recorded in every cache's metadata)."""

__version__ = "0.1.0"
