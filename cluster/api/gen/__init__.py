"""Modules generated from cluster/proto/tandem/v1/tandem.proto; never edited by hand.

Regenerate with `python cluster/proto/generate.py` after changing the .proto (a test
fails while the committed files differ from a fresh generation).
"""
