"""Helpers shared by the tests (and the cluster benchmarks): a private redis-server, a
Ray Serve cluster on loopback with a chat workload, the Helm chart rendered through the
Helm SDK, transformers' reference model, MoE test weights."""
