"""Timing and memory benchmarks, one module each, run as `python -m experiments.bench.<name>`.

`layers` (one adapted layer per execution strategy), `step` and `llm_step` (training steps),
`apply` and `apply_scale` (building the factors), `generate` (decoding), `nnx` (the NNX path
against qwix LoRA), `adapters` (serving many adapters) and `adapter_size` (bytes on disk).
Their committed results are experiments/results/bench_<name>*.md (names kept from when the
modules were experiments/bench_<name>.py); shared helpers live in `experiments.harness.bench`.
"""
