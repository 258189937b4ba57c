"""fortress: robust federated sequential recommendation."""
import os

__version__ = "0.1.0"

# cuBLAS is deterministic only with a fixed workspace; it reads this before its first call (a no-op without CUDA)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
