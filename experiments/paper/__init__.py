"""Paper reproductions for SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597).

One task per table of the paper, all on the harness (the driver `experiments.harness.train`, the
dataclass config reader `experiments.harness.config`, the data path `experiments.harness.data`, the method
presets `experiments.harness.presets`):

- `glue.py`                  GLUE (paper Table 3; DeBERTaV3-base there, RoBERTa/BERT here)
- `image_classification.py`  ViT-B/16, ViT-L/16 on CIFAR-100, Flowers102, Food101, RESISC45
- `math_reasoning.py`        GSM-8K and MATH after MetaMathQA-style SFT (Gemma / Llama)
- `commonsense.py`           BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA

Hyperparameters live in `configs.py` (each with its source), causal-LM SFT and greedy decoding
in `lm.py`, and the pieces every task shares (its options schema, CLI, metrics JSON) in
`common.py`. Run from the repository root, e.g.
`python -m experiments.paper.glue --task=sst2 --model=tiny --config.steps=5`.
"""
