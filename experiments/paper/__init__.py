"""Paper reproductions for SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597).

One script per table of the paper, all sharing the generic driver `experiments/train.py`:

- `glue.py`                  GLUE (paper Table 3; DeBERTaV3-base there, RoBERTa/BERT here)
- `image_classification.py`  ViT-B/16, ViT-L/16 on CIFAR-100, Flowers102, Food101, RESISC45
- `math_reasoning.py`        GSM-8K and MATH after MetaMathQA-style SFT (Gemma / Llama)
- `commonsense.py`           BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA

Hyperparameters live in `configs.py` (each with its source), data plumbing (TFDS array_record
sources + grain) in `data.py`, text/tokenisation in `text.py`, causal-LM SFT and greedy
decoding in `lm.py`, and the pieces every script shares (adapters, CLI, evaluation, metrics
JSON) in `common.py`. Run from the repository root, e.g.
`python -m experiments.paper.glue --task=sst2 --model=tiny --config.steps=5`.
"""
