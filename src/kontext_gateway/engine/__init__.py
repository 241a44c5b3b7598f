"""The local Kontext engine. Modules that import torch are imported only when a local model is used."""

import os

# OpenMP's default is to spin-wait between parallel regions. On a shared CPU (two gateways, or the
# gateway beside another torch job) the spinners starve each other: a 256x256 edit went from 0.06 s
# to ~3 s in benchmarks/RESULTS.md. Passive waiting costs ~20-40 ms on tiny images and nothing at
# 1024x1024. Set before torch loads; an operator's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
