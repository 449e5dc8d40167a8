"""Every public namespace exports a bounded, real set of names, and exports what the README,
the docs and the experiments use from it.

Truth: the modules themselves (each `__all__` name resolves) and the text of README.md,
docs/*.md and experiments/*.py (every `from svft_jax.<ns> import name` / `svft_jax.<ns>.name` they use is in
`<ns>.__all__` or is a submodule)."""

import importlib
import pathlib
import re

import pytest

import svft_jax

REPO = pathlib.Path(__file__).resolve().parents[1]

# Upper bounds on each namespace's `__all__` (issue 19: the surface only grows on purpose).
# The top level holds the user contract, the typed configs and rules, and one-release aliases.
BOUNDS = {
    "svft_jax": 35,  # also tests/test_package.py
    "svft_jax.banks": 20,
    "svft_jax.baselines": 7,
    "svft_jax.checkpoint": 20,
    "svft_jax.core": 30,
    "svft_jax.distributed": 15,
    "svft_jax.errors": 10,
    "svft_jax.methods": 4,
    "svft_jax.methods.svft": 8,
    "svft_jax.models": 30,
    "svft_jax.nnx": 30,
    "svft_jax.patterns": 17,
    "svft_jax.strategies": 14,
    "svft_jax.training": 17,
}
ALIASES = {"svft_jax.adapters": "svft_jax.banks"}  # renamed in issue 19, kept one release


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_namespace_all_is_bounded_and_resolves(name):
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    assert len(exported) <= BOUNDS[name], f"{name}.__all__ has {len(exported)} names (bound {BOUNDS[name]})"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which the module does not define"


@pytest.mark.parametrize("old, new", sorted(ALIASES.items()))
def test_renamed_namespace_exports_the_same_objects(old, new):
    a, b = importlib.import_module(old), importlib.import_module(new)
    assert sorted(a.__all__) == sorted(b.__all__)
    assert all(getattr(a, n) is getattr(b, n) for n in b.__all__)


def _uses():
    """(namespace, name) pairs the README and experiments use."""
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "experiments").rglob("*.py"))]
    for path in texts:
        if not path.exists():
            continue
        text = path.read_text()
        for ns, grouped, line in re.findall(r"from (svft_jax\.[a-z_]+) import (?:\(([^)]*)\)|([^\n#(]*))", text):
            for item in (grouped or line).split(","):
                n = item.split(" as ")[0].strip()
                if n:
                    yield path.name, ns, n
        for ns, n in re.findall(r"(?<![\w.])(svft_jax\.[a-z_]+)\.([A-Za-z_]\w*)(?![\w.]*\s*=)", text):
            yield path.name, ns, n


def test_readme_and_experiments_use_only_exported_names():
    bad = []
    for where, ns, name in _uses():
        ns = ALIASES.get(ns, ns)
        if ns not in BOUNDS or name.startswith("_"):
            continue  # a module path (svft_jax.models.hf) or a private helper
        module = importlib.import_module(ns)
        if name in module.__all__ or importlib.util.find_spec(f"{ns}.{name}") is not None:
            continue
        bad.append(f"{where}: {ns}.{name}")
    assert not bad, "used but not exported: " + ", ".join(sorted(set(bad)))


def test_the_facade_exports_the_typed_configs_and_verbs():
    for name in ("adapt", "size", "Rule", "Method", "SVFT", "LoRA", "DoRA", "VeRA", "Banded", "Plain", "Random", "TopK"):
        assert name in svft_jax.__all__
