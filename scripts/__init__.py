"""Benchmarks and experiments, each a module run from the repository root as
``python -m scripts.NAME`` (``--help`` lists its options). Code they share lives in
``scripts.common`` (and ``scripts.cifar`` for the CIFAR-10 pipeline); no script imports
another. They need compress and its built-in plugins importable: installed
(``pip install -e .``) or through ``PYTHONPATH=.:plugins``. The test suite does not import them.
"""
