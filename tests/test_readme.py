"""The README's quick start runs as written, on whichever supported stack is installed (it
uses flax linen only, so it runs on transformers 5 too).

Truth: the band's size |Ω| = r + 2·Σ_{k=1..d} (r − k) for each kernel's rank r, and the head's
size; one optimiser step moves M and the head and nothing else.
"""

import jax
import numpy as np

from tests.test_docs import code_block


def _band(r: int, d: int) -> int:
    return r + 2 * sum(r - k for k in range(1, d + 1))


def test_quick_start_runs_and_trains_exactly_the_band_and_the_head(capsys):
    scope: dict = {}
    exec(compile(code_block("README.md", "Quick start"), "README.md#quick-start", "exec"), scope)
    import svft_jax

    counts = svft_jax.count_parameters(svft_jax.combine(scope["train"], scope["frozen"]))
    assert counts["trainable"] == _band(128, 2) + _band(256, 2) + (256 * 2 + 2)
    assert "adapted targets: 2" in capsys.readouterr().out
    before, _ = svft_jax.split(scope["adapted"])
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, scope["train"])
    assert all(jax.tree.leaves(moved))  # every trainable leaf (M of both kernels, the head) moved
