"""Shared pytest set-up.

Triton decides between compiling and interpreting when a kernel is decorated, so the
interpreter switch must be set before any kernel module is imported: on a machine with
no GPU every Triton kernel test runs through `TRITON_INTERPRET=1`.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

try:  # the GPU machine has no redis client; tests needing Redis do not run there
    from tests.support.redis_fixtures import private_redis, redis_server, redis_url  # noqa: F401
except ImportError:
    pass


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded default checkpoint, written once per test session (not to ~/.cache)."""
    from tandem.workers.synthetic.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
