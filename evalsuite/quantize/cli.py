"""``evalsuite schemes``: the scheme names ``--quant`` accepts."""

from __future__ import annotations

import argparse

from tabulate import tabulate


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    from evalsuite.quantize.registry import _SCHEMES

    rows = [(s.example if "(" in s.pattern else s.pattern, s.description) for s in _SCHEMES.values()]
    print(tabulate(rows, headers=["scheme", "what it does"]))
    print("\nint4 group sizes: int4-wo-g32, -g64, -g128, -g256. Append +head to quantize the output head too.")
    return 0
