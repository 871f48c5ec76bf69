"""milterbridge: one milter towards the MTA, many milters and HTTP hooks behind it."""

__version__ = "0.1.0"
__all__ = ["__version__"]
