#!/usr/bin/env python3
"""Saves a randomly initialised official SAM (torch.manual_seed(0)) as a torch.save'd state_dict,
atomically: the checkpoint the benchmarks load on both sides. Usage: VARIANT PATH"""
import os
import sys

import torch
from segment_anything import sam_model_registry

torch.manual_seed(0)
torch.save(sam_model_registry[sys.argv[1]]().state_dict(), sys.argv[2] + ".tmp")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
