"""The committed generated modules are exactly what cluster/proto/generate.py produces
from the committed .proto, and they work with the installed protobuf and grpc runtimes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GEN_DIR = REPO / "cluster" / "api" / "gen"
GENERATE = REPO / "cluster" / "proto" / "generate.py"
GENERATED = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def _load_generate_module():
    spec = importlib.util.spec_from_file_location("tandem_proto_generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_code_matches_a_fresh_generation(tmp_path):
    written = _load_generate_module().generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(GENERATED)
    stale = [
        name
        for name in GENERATED
        if (tmp_path / name).read_bytes() != (GEN_DIR / name).read_bytes()
    ]
    assert not stale, (
        f"{stale} differ from a fresh generation: run `python cluster/proto/generate.py` "
        "after changing cluster/proto/tandem/v1/tandem.proto, and never edit them by hand"
    )


def test_generate_script_runs_as_a_command(tmp_path):
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(GENERATED)


def test_generated_code_imports_in_a_clean_interpreter():
    # A fresh process, so nothing imported by other tests hides a broken import path
    # or a protobuf/grpc runtime version the generated code refuses.
    code = (
        "from tandem.cluster.api.gen import tandem_pb2, tandem_pb2_grpc; "
        "print(tandem_pb2.DESCRIPTOR.name, tandem_pb2_grpc.TandemStub.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["tandem/v1/tandem.proto", "TandemStub"]


def test_service_shape_and_field_presence():
    from tandem.cluster.api.gen import tandem_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Tandem"]
    assert service.full_name == "tandem.v1.Tandem"
    shapes = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert shapes == {
        "Generate": ("GenerateRequest", "GenerateChunk", False, True),
        "Chat": ("ChatRequest", "ChatChunk", False, True),
        "Health": ("HealthRequest", "HealthResponse", False, False),
        "ListModels": ("ListModelsRequest", "ListModelsResponse", False, False),
    }
    # proto3 `optional`: an explicit zero is distinguishable from "not set".
    params = pb.SamplingParameters(temperature=0.0)
    assert params.HasField("temperature") and not params.HasField("top_p")
    decoded = pb.SamplingParameters.FromString(params.SerializeToString())
    assert decoded.HasField("temperature") and decoded.temperature == 0.0
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]))
    assert request.WhichOneof("prompt") == "token_ids"
    request.text = "hi"
    assert request.WhichOneof("prompt") == "text"


def test_messages_pickle_under_their_committed_module():
    import pickle

    from tandem.cluster.api.gen import tandem_pb2 as pb

    assert pb.GenerateChunk.__module__ == "tandem.cluster.api.gen.tandem_pb2"
    chunk = pb.GenerateChunk(request_id="r", token_ids=[1, 2], text_delta="ab")
    assert pickle.loads(pickle.dumps(chunk)) == chunk


@pytest.mark.parametrize("name", GENERATED)
def test_generated_files_carry_the_regenerate_note(name):
    head = (GEN_DIR / name).read_text(encoding="utf-8").splitlines()[:2]
    assert head[0] == "# ruff: noqa"
    assert "cluster/proto/generate.py" in head[1]
