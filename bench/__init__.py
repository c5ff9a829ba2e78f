"""Benchmarks of sma-kernels against pure-PyTorch routes; run ``python -m bench`` (see __main__)."""
