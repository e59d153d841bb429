"""The version of mcllava (what banks and exports record)."""

__version__ = "0.1.0"
