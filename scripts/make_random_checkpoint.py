#!/usr/bin/env python3
"""Saves a randomly initialised SAM built from the official modules (torch.manual_seed(SEED),
default 0) as a torch.save'd state_dict, atomically. The benchmarks load it on both sides; the
skinsam_tiny training run starts from it. Usage: VARIANT PATH [SEED]"""
import os
import sys

import torch

from sam_builders import build


def main():
    variant, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    sam = build(variant)
    torch.save(sam.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
