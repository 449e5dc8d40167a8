"""Moved to `svft_jax.methods.svft._node` (issue 19); this path is an alias kept for one release (see CHANGELOG.md)."""

import sys

from svft_jax.methods.svft import _node as _moved

sys.modules[__name__] = _moved
