"""The svft-jax experiment harness: one loop, one config system, one data path, shared presets.

Run tasks from the repository root as modules (`pip install -e ".[experiments]"` makes the
package importable from anywhere):

    python -m experiments.demo                 # `make demo`: SVFT vs LoRA vs head-only, ~1 min
    python -m experiments.sentiment            # the full offline experiment (10 methods x 3 seeds)
    python -m experiments.paper.glue --task=sst2 --method=svft_banded_d2
    python -m experiments.bench_step --config=bert-16x64

Modules: `train` (the driver: `TrainConfig`, `Task`, `run`), `config` (the dataclass
command-line reader), `data` (tfds data_source + grain, the padding rule), `presets` (method
presets), `models` (model builders), `report` (method x seed grids: tables, plots, files).
The library never imports this package.
"""
