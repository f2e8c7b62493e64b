"""Experiments built on the library (research code; the library never imports it).

``experiment1``: the paper's experiment 1 (learned optimizers meta-trained per task, selected on
tuning seeds, evaluated on unseen seeds; ``scripts/experiment1.py``). ``heldout``: the held-out
architectures no shipped optimizer was meta-trained on, and the candidates evaluated on them
(``scripts/evaluate_direction.py``, ``scripts/demo.py``).
"""
