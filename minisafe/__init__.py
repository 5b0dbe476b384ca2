"""minisafe: find and protect the safety layers of aligned language models, in plain PyTorch."""

import os

# oneDNN keeps the CPU matmul kernels it has built for each shape in a cache of 1024 by default. Training and
# generation run at many sequence lengths, and once the kernels in use outnumber the cache it rebuilds evicted ones,
# so a long-running process slows step after step. oneDNN reads this when it builds its first kernel, so it takes
# effect in every process that imports minisafe before running a matmul (train.py, the pipeline and its children);
# a value set by the user wins. It costs memory for the kept kernels, not exactness: the same kernels run.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

from minisafe.checkpoint import load, save  # noqa: E402

__all__ = ["load", "save"]
