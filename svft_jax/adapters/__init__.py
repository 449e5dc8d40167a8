"""Renamed `svft_jax.banks` (issue 19: "adapters" also meant the protocol and the files); this
alias re-exports it for one release (CHANGELOG.md)."""

from svft_jax.adapters import _arithmetic, _files, _node, _set, _strategy  # noqa: E402, F401  (old submodules)
from svft_jax.methods.svft.banks import *  # noqa: F403
from svft_jax.methods.svft.banks import __all__ as __all__
