"""Flower glue: a ClientApp and a ServerApp over the same core as the in-process simulator.

Needs the optional dependency: pip install -e ".[flower]" (flwr[simulation]==1.41.0).
"""
