"""Regenerate the Python modules of the tandem protobuf API.

    .venv/bin/python cluster/proto/generate.py            # rewrites cluster/api/gen/
    .venv/bin/python cluster/proto/generate.py --out DIR  # somewhere else (tests compare)

protoc names a generated module after the .proto's path under the include root, so
`tandem/v1/tandem.proto` becomes `tandem.v1.tandem_pb2`, and the gRPC module imports it
by that name. We commit the modules flat in `cluster/api/gen/` instead, with that
import (and the messages' module name) rewritten to `tandem.cluster.api.gen.tandem_pb2`: the
package imports without putting
anything on sys.path. The descriptor keeps its proto path ("tandem/v1/tandem.proto"),
so the wire format and the full names (tandem.v1.Tandem/Generate) are unchanged.

The committed files are exactly what this script writes; tests/test_proto_generated.py
regenerates into a temporary directory and compares byte for byte.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "tandem/v1/tandem.proto"
REPO_ROOT = PROTO_ROOT.parent.parent
DEFAULT_OUT = REPO_ROOT / "cluster" / "api" / "gen"
# The package the committed modules live in.
GEN_PACKAGE = "tandem.cluster.api.gen"
GENERATED = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")
# Generated code does not follow our lint rules; the file-level marker keeps ruff out.
_HEADER = "# ruff: noqa\n# Regenerate with: python cluster/proto/generate.py (source: {proto})\n"


def _rewrite_module_names(text: str) -> str:
    """Point the gRPC module's import, and the messages' __module__ (which pickle uses to
    find the class again), at the package the files are committed in."""
    text = text.replace(
        "from tandem.v1 import tandem_pb2 as", f"from {GEN_PACKAGE} import tandem_pb2 as"
    )
    return text.replace("'tandem.v1.tandem_pb2'", f"'{GEN_PACKAGE}.tandem_pb2'")


def generate(out_dir: str | Path = DEFAULT_OUT) -> list[Path]:
    """Run protoc on tandem.proto and write GENERATED into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="tandem-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed (exit {status}) on {PROTO_ROOT / PROTO_FILE}")
        written = []
        src_dir = Path(tmp) / Path(PROTO_FILE).parent
        for name in GENERATED:
            text = (src_dir / name).read_text(encoding="utf-8")
            text = _HEADER.format(proto=f"cluster/proto/{PROTO_FILE}") + _rewrite_module_names(text)
            dest = out_dir / name
            dest.write_text(text, encoding="utf-8")
            written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
