"""SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597) — the method's folder: its typed config
and keyword `apply` (`_config.py`), its plan, node, math, init and the authors' "reference"
strategy (`_node.py`), SVD back-ends (`_factorize.py`), and the SVFT-only serving banks
(`banks/`: many coefficient vectors over one set of frozen factors)."""

from svft_jax.errors import PrecisionWarning
from svft_jax.methods.svft._config import SVFT, apply, make_plans
from svft_jax.methods.svft._node import (
    StaticIndices,
    SVFTMeta,
    SVFTNode,
    SVFTPlan,
)

__all__ = ["SVFT", "PrecisionWarning", "SVFTMeta", "SVFTNode", "SVFTPlan", "StaticIndices", "apply", "make_plans"]
