"""Training the packaged default model: corpus from the Python standard library, tokenizer, MoE training.

    python -m localglm.training.train --out localglm/data/default_model

README.md ("The default model") gives the exact command and the numbers of the shipped model.
"""
