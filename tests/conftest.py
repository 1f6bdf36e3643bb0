"""Test session setup: 8 simulated CPU devices so sharded runs can be compared with one device."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
