"""Moved to `svft_jax.methods.lora` (issue 19); this path is an alias kept for one release (see CHANGELOG.md)."""

import sys

from svft_jax.methods import lora as _moved

sys.modules[__name__] = _moved
