"""Moved to `svft_jax.methods.svft.banks._arithmetic` (issue 19); this path is an alias kept for one release (see CHANGELOG.md)."""

import sys

from svft_jax.methods.svft.banks import _arithmetic as _moved

sys.modules[__name__] = _moved
