"""Experiments a user runs, each a module on the harness (`experiments.harness`).

`demo` (`make demo`: SVFT vs LoRA vs head-only in about a minute), `sentiment` (the full
offline experiment on `rotten_tomatoes`, the TFDS builder of its data), `addition` (an LLM
learning multi-digit addition, `--resume` for long runs) and `many_adapters` (several adapters
served on one base). Run as `python -m experiments.tasks.<name>`; results go to
experiments/results/.
"""
