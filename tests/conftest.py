"""Test-session settings."""

import torch

# The suite's tensors are small: one thread is as fast, and it avoids OpenMP spin-waits that make a
# 2-core machine shared with other jobs up to 100x slower (seen here while benchmarks ran).
torch.set_num_threads(1)
