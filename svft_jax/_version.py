"""The installed distribution's version (read by the façade and by file headers)."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("svft-jax")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
