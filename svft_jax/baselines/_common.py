"""Moved to `svft_jax.methods._common` (issue 19); this path is an alias kept for one release (see CHANGELOG.md)."""

import sys

from svft_jax.methods import _common as _moved

sys.modules[__name__] = _moved
