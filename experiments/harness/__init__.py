"""The experiment harness: one loop, one config system, one data path, shared presets.

`train` is the driver (`TrainConfig`, `Task`, `run`), `config` the dataclass command-line
reader, `data` the data path (tfds data_source + grain, the padding rule), `presets` the
method presets, `models` the model builders, `text` the tokenizers, `report` method x seed
grids (tables, plots, results files, `--resume`), and `bench` the helpers the benchmarks and
reports share (machine description, timing, markdown tables). Tasks (`experiments.tasks`),
benchmarks (`experiments.bench`) and the paper's experiments (`experiments.paper`) are built
on these modules; nothing here imports them.
"""
