"""The svft-jax experiments: one harness, the tasks built on it, benchmarks, and the paper's tables.

Run everything from the repository root as modules (`pip install -e ".[experiments]"` makes the
package importable from anywhere):

    python -m experiments.tasks.demo           # `make demo`: SVFT vs LoRA vs head-only, ~1 min
    python -m experiments.tasks.sentiment      # the full offline experiment (10 methods x 3 seeds)
    python -m experiments.paper.glue --task=sst2 --method=svft_banded_d2
    python -m experiments.bench.step --config=bert-16x64

Subpackages: `harness` (the driver `train`, the dataclass command-line reader `config`, the
data path `data`, method `presets`, model builders `models`, tokenizers `text`, method x seed
grids `report`, benchmark helpers `bench`), `tasks` (experiments a user runs: `demo`,
`sentiment`, `addition`, ...), `bench` (timing and memory benchmarks), `paper` (the paper's
tables). Committed results live in experiments/results/, run outputs in experiments/runs/.
The library never imports this package.
"""
