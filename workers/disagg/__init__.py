"""Disaggregated prefill and decode: the worker roles and their messages (roles.py) over
the KV transfer data plane (transfer/)."""
