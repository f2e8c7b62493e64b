"""Experiment 2 of the UNF paper (research code; the library never imports it).

``addition``: the multi-digit addition task the zoo's RNNs learn; ``rnn_zoo``: the zoo of small
trained RNNs and the UNF / Deep Set / STATNN predictors of their success rate
(``scripts/rnn_zoo.py``, docs/rnn_zoo.md).
"""
