"""Benchmarks of sma-kernels against pure-PyTorch routes; run ``python -m bench`` (see __main__)."""


def summary(doc: str) -> str:
    """A command's ``--help`` description: the first paragraph of its module docstring."""
    return " ".join(doc.split("\n\n")[0].split())
