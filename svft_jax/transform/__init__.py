"""Moved (issue 19): the protocol and generic verbs to `svft_jax.core`, SVFT to
`svft_jax.methods.svft`. This namespace re-exports its old names for one release (CHANGELOG.md)."""

from svft_jax.core import *  # noqa: F403
from svft_jax.core import __all__ as _core_all
from svft_jax.methods.svft import *  # noqa: F403
from svft_jax.methods.svft import __all__ as _svft_all

__all__ = sorted({*_core_all, *_svft_all})  # noqa: PLE0605

# The old submodules, as attributes too (`svft_jax.transform._targets.flatten_by_path`).
from svft_jax.transform import (  # noqa: E402, F401
    _factorize,
    _matmul,
    _merge,
    _partition,
    _plan,
    _protocol,
    _summary,
    _targets,
    layout,
    svft,
)
