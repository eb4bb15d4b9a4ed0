"""Deployment files. Installed as `tandem.deploy` only to ship serve-config.yaml, the
default Serve application config, as package data (read through importlib.resources by
tandem.cluster.config); the Helm chart in helm/ is not part of the Python package."""
