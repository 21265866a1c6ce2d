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
    print("Your own quantization (README, 'Test your own quantization'):\n"
          "  FILE.py:Name, package.module:Name     a gpt-fast handler class or fn(model) -> model; imports and RUNS that code\n"
          "  torchao:Config(key=literal, ...)      a torchao config through torchao.quantization.quantize_\n"
          "  NAME=SPEC                             names the variant in records, reports and baseline paths\n"
          "  --variant-model NAME=PATH             a checkpoint quantized elsewhere (HF folder, .gguf, gpt-fast .pth)")
    return 0
