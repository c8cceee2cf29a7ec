"""digitwatch: a folder that reads handwritten digits."""

__version__ = "0.1.0"
