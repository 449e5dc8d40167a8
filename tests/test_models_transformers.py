"""svft_jax.models on the installed transformers (4.x with Flax models, or 5 without them).

Truth: the installed package's version (read by importlib.metadata); what transformers 5
removed (its Flax model classes); the hub client's own keyword (`local_files_only`), with
the client mocked (no network in tests).
"""

from __future__ import annotations

import importlib.metadata
import shutil

import numpy as np
import pytest

import svft_jax.models as svft_models

HAS_FLAX_MODELS = svft_models.has_flax_models()
NEEDS_FLAX = pytest.mark.skipif(not HAS_FLAX_MODELS, reason="transformers >= 5 has no Flax models")


def _pretend_transformers(monkeypatch, version: str):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: version if name == "transformers" else real(name))


def test_has_flax_models_follows_the_installed_major_version():
    version = importlib.metadata.version("transformers")
    assert HAS_FLAX_MODELS == (int(version.split(".")[0]) < 5)


@pytest.mark.parametrize("call", ["load_pretrained", "load_pretrained_gguf", "honour_rope_theta"])
def test_transformers_5_refuses_at_the_call_naming_version_reason_and_ways_out(monkeypatch, call):
    """Before any import of a Flax model module: the message names the version, why, and the
    `models` extra and the NNX path."""
    _pretend_transformers(monkeypatch, "5.3.1")
    run = {"load_pretrained": lambda: svft_models.load_pretrained(svft_models.minilm_path()),
           "load_pretrained_gguf": lambda: svft_models.load_pretrained(str(svft_models.smollm2_path())),
           "honour_rope_theta": svft_models.honour_rope_theta}[call]
    with pytest.raises(svft_models.FlaxModelsUnavailableError) as info:
        run()
    message = str(info.value)
    assert "transformers 5.3.1" in message and "removed its Flax models" in message
    assert "svft-jax[models]" in message and "NNX" in message
    assert "modeling_flax" not in message


@pytest.mark.skipif(HAS_FLAX_MODELS, reason="needs transformers >= 5 installed")
def test_real_transformers_5_refuses_an_hf_flax_checkpoint():
    with pytest.raises(svft_models.FlaxModelsUnavailableError, match=r"transformers 5\.\d+"):
        svft_models.load_pretrained(svft_models.minilm_path(), "FlaxBertModel")


def test_missing_transformers_is_named(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "transformers":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(svft_models.FlaxModelsUnavailableError, match="transformers is not installed"):
        svft_models.load_pretrained(svft_models.minilm_path())


def test_gguf_config_and_targets_work_on_either_transformers():
    """What needs no Flax classes: a GGUF's config and the default targets of its family."""
    import gguf

    reader = gguf.GGUFReader(svft_models.smollm2_path())
    config = svft_models.gguf_config(reader)
    assert (config.num_hidden_layers, config.hidden_size, svft_models.rope_theta_of(config)) == (30, 576, 1e5)
    assert svft_models.model_type_of(config) == "llama"
    # θ = 1e5 reaches the inverse frequencies on either transformers (v5 keeps it in rope_parameters)
    head_dim = config.hidden_size // config.num_attention_heads
    want = 1e5 ** (-np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(svft_models.rope_inverse_frequencies(config, head_dim), want, rtol=1e-12)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """`huggingface_hub.snapshot_download` replaced by a copy of the shipped MiniLM; records its calls."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise FileNotFoundError(f"{repo_id} is not in the local cache")
        target = tmp_path / repo_id.replace("/", "--")
        if not target.exists():
            shutil.copytree(svft_models.minilm_path(), target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@NEEDS_FLAX
def test_a_hub_name_downloads_by_default(fake_hub):
    model, params = svft_models.load_pretrained("sentence-transformers/all-MiniLM-L6-v2", "FlaxBertModel")
    assert [c[0] for c in fake_hub] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert fake_hub[0][1]["local_files_only"] is False
    assert params["embeddings"]["word_embeddings"]["embedding"].shape == (model.config.vocab_size, 384)


@NEEDS_FLAX
def test_local_files_only_is_passed_to_the_hub_client_and_named_in_the_refusal(fake_hub):
    with pytest.raises(FileNotFoundError, match="local_files_only=True") as info:
        svft_models.load_pretrained("org/absent", local_files_only=True, revision="v1")
    assert fake_hub == [("org/absent", {"revision": "v1", "local_files_only": True,
                                        "allow_patterns": list(svft_models.hf.HUB_FILES)})]
    assert "org/absent" in str(info.value)
