"""The package surface: lean core imports, a small public namespace, no shadowed modules."""

import importlib
import subprocess
import sys
import types

import svft_jax

OPTIONAL = ("transformers", "tensorflow_datasets", "grain", "ml_collections", "matplotlib", "chex")


def test_core_namespaces_import_without_the_optional_dependencies():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in OPTIONAL)  # `import x` then raises ImportError
    code = (f"import sys; {blocked}; import svft_jax, svft_jax.baselines, svft_jax.checkpoint, svft_jax.training, "
            "svft_jax.distributed, svft_jax.strategies; import jax.numpy as jnp; "
            "svft_jax.merge(svft_jax.apply({'w': {'kernel': jnp.ones((3, 2))}}, 'plain'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_top_level_surface_is_small_and_every_name_resolves():
    assert 25 <= len(svft_jax.__all__) <= 35
    for name in svft_jax.__all__:
        assert getattr(svft_jax, name) is not None
    for name in ("apply", "merge", "split", "combine", "trainable_mask", "optimizer", "summary",
                 "count_parameters", "select_targets", "wrap", "is_node", "SVFTNode"):
        assert name in svft_jax.__all__  # the user contract


def test_no_module_is_shadowed_by_a_function_of_the_same_name():
    for package in ("svft_jax", "svft_jax.transform", "svft_jax.strategies", "svft_jax.training",
                    "svft_jax.checkpoint", "svft_jax.baselines", "svft_jax.patterns", "svft_jax.models", "svft_jax.distributed"):
        module = importlib.import_module(package)
        for info in getattr(module, "__path__", []) and __import__("pkgutil").iter_modules(module.__path__):
            attribute = getattr(module, info.name, None)
            assert attribute is None or isinstance(attribute, types.ModuleType), f"{package}.{info.name} is a {type(attribute).__name__}"


def test_version_comes_from_the_package_metadata():
    from importlib import metadata

    assert svft_jax.__version__ == metadata.version("svft-jax")
