"""Moved to `svft_jax.methods.vera` (issue 19); this path is an alias kept for one release (see CHANGELOG.md)."""

import sys

from svft_jax.methods import vera as _moved

sys.modules[__name__] = _moved
