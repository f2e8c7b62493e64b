"""Helpers for tests and benchmarks, not part of the optimizer API.

``unf_reference``: the UNF authors' layer written independently (loops over the map types), the
ground truth that ``tests/test_unf.py`` and ``scripts/bench_unf.py`` compare the fast layer to.
``authors_specs``: the UNF authors' permutation specs of the paper's four tasks, which
``tests/test_authors_specs.py`` checks the library's specs and layer counts against.
"""
