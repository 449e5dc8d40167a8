"""Many adapters on one base, on real weights: all-MiniLM-L6-v2 serving two SVFT adapters at once.

    OPENBLAS_NUM_THREADS=1 python -m experiments.tasks.many_adapters [--steps 30]

The installed sentence encoder (`svft_jax.models.minilm_path()`) gets one adapter set (banded
d=2 on q/k/v/o of the 6 layers; one SVD, shared). Two adapters are trained on the same dozen
review snippets for two "prompts": "up" pulls each snippet's mean-pooled embedding towards the
embedding of "an absolutely wonderful, delightful film", "down" towards "a dull, terrible,
boring mess" (loss 1 − cosine). Each is trained as an ordinary SVFT tree (`banks.extract`,
`svft_jax.optimizer`), while the other stays frozen, and put back with `banks.insert`.

Then one jitted, routed forward pass serves a batch in which each example picks "up", "down" or
the base model (`banks.route`), and each row is compared with that adapter's own merged
model; finally `banks.mix` interpolates (1 − α)·up + α·down, and the cosine to both anchors
moves from one to the other. Output is Markdown (committed as experiments/results/many_adapters.md).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import svft_jax  # noqa: E402
import svft_jax.banks as banks  # noqa: E402
import svft_jax.models as svft_models  # noqa: E402
from experiments.harness.models import run_adapted  # noqa: E402

SNIPPETS = [
    "the plot wanders but the actors hold it together",
    "a film about a family on a long road trip",
    "it runs two hours and has a lot of dialogue",
    "the director's third feature, set in paris",
    "some scenes work, others fall flat",
    "a remake of a seventies thriller",
    "the soundtrack is loud and the colours are bright",
    "an animated story for children and their parents",
    "a documentary about a small fishing town",
    "the sequel picks up where the first one ended",
    "a courtroom drama with a twist near the end",
    "two strangers meet on a train",
]
ANCHORS = {"up": "an absolutely wonderful, delightful film", "down": "a dull, terrible, boring mess"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    started = time.perf_counter()
    path = svft_models.minilm_path()
    model, params = svft_models.load_pretrained(path, "FlaxBertModel")
    tokenizer = AutoTokenizer.from_pretrained(str(path))

    def encode(texts):
        batch = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="np")
        return jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])

    def embed(p, ids, mask):
        hidden = model(ids, attention_mask=mask, params=p).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

    ids, mask = encode(SNIPPETS)
    anchor_ids, anchor_mask = encode(list(ANCHORS.values()))
    anchors = jax.jit(embed)(params, anchor_ids, anchor_mask)  # (2, 384), from the base model

    base = svft_models.adapt(model, params, "banded", d=2, attention_only=True)
    tree = banks.add(banks.create(base, "up"), "down")  # both at M = 0, one SVD
    print("# Many adapters on one base: all-MiniLM-L6-v2\n")
    print("```")
    banks.summary(tree)
    print("```\n")

    tx = svft_jax.optimizer(optax.adam(args.lr))
    # Training runs on the library's fastest exact path (wrap(auto, strict)), not a merge per step.
    adapted_embed = run_adapted(embed, params_argname=None)
    for k, name in enumerate(ANCHORS):
        trainable, frozen = svft_jax.split(banks.extract(tree, name))  # only this adapter's m trains

        def loss_fn(trainable, frozen=frozen, k=k):
            e = adapted_embed(svft_jax.combine(trainable, frozen), ids, mask)
            return jnp.mean(1.0 - e @ anchors[k])

        @jax.jit
        def step(trainable, state, loss_fn=loss_fn):
            loss, grads = jax.value_and_grad(loss_fn)(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state, loss

        state = tx.init(trainable)
        first = float(loss_fn(trainable))
        for _ in range(args.steps):
            trainable, state, loss = step(trainable, state)
        print(f"- trained **{name}** ({args.steps} Adam steps, lr {args.lr}): loss 1 − cos(snippet, “{ANCHORS[name]}”) "
              f"{first:.4f} → {float(loss_fn(trainable)):.4f}")
        tree = banks.insert(tree, name, svft_jax.combine(trainable, frozen))

    # One routed pass: each example picks its adapter; compare with that adapter's merged model.
    routed_embed = jax.jit(svft_jax.wrap(embed, strategy="routed"))
    choice = np.array([0, 1, -1, 1, 0, -1, 0, 1, 1, 0, -1, 0])  # up/down/base per example
    served = np.asarray(routed_embed(banks.route(tree, choice), ids, mask))
    merged = {name: jax.jit(svft_jax.merge)(banks.extract(tree, name)) for name in ANCHORS}
    singles = {name: np.asarray(jax.jit(embed)(merged[name], ids, mask)) for name in ANCHORS}
    singles["base"] = np.asarray(jax.jit(embed)(params, ids, mask))
    labels = [("up", "down")[c] if c >= 0 else "base" for c in choice]
    print("\n## One batch, per-example routing (12 snippets, adapters chosen per row)\n")
    print("| # | snippet | adapter | cos to up-anchor | cos to down-anchor | max abs diff vs its own merged model |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for b, label in enumerate(labels):
        diff = float(np.abs(served[b] - singles[label][b]).max())
        worst = max(worst, diff)
        print(f"| {b} | {SNIPPETS[b]} | {label} | {served[b] @ np.asarray(anchors[0]):.4f} | {served[b] @ np.asarray(anchors[1]):.4f} | {diff:.2e} |")
    print(f"\nLargest difference between a routed row and the same snippet through its own merged model: **{worst:.2e}** "
          "(float32 rounding; the routed pass never forms a per-adapter weight).\n")

    print("## Interpolation (1 − α)·up + α·down (`banks.mix`; ΔW is linear in M)\n")
    traces = []

    def counted(p, ids, mask):
        traces.append(1)  # runs once per trace, not per call
        return svft_jax.wrap(embed, strategy="routed")(p, ids, mask)

    mixed_embed = jax.jit(counted)
    print("| α | mean cos to up-anchor | mean cos to down-anchor |")
    print("|---|---|---|")
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        e = np.asarray(mixed_embed(banks.mix(tree, {"up": 1 - alpha, "down": alpha}), ids, mask))
        print(f"| {alpha:.2f} | {np.mean(e @ np.asarray(anchors[0])):.4f} | {np.mean(e @ np.asarray(anchors[1])):.4f} |")
    e = singles["base"]
    print(f"| base | {np.mean(e @ np.asarray(anchors[0])):.4f} | {np.mean(e @ np.asarray(anchors[1])):.4f} |")
    print(f"\nThe five mixes ran on {len(traces)} trace(s) of one jitted function: the weights are data. Total time {time.perf_counter() - started:.0f} s on "
          f"{jax.devices()[0].platform}.")


if __name__ == "__main__":
    main()
