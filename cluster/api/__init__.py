"""The gRPC API of tandem (service `tandem.v1.Tandem`, cluster/proto/tandem/v1/tandem.proto).

    client ──gRPC──> server.py ──> GenerationBackend (backend.py)
                      │  auth, deadlines,      ├─ InProcessBackend: one AsyncLLMEngine
                      │  status codes          └─ the Ray Serve cluster's backend
                      └─ convert.py: proto <-> SamplingParams / engine outputs / harmony

The server validates, tokenizes and renders harmony at the front, so every backend
receives token ids and checked SamplingParams. This package's `__init__` imports nothing,
so the client (cluster/client.py) can use the generated modules without torch.
"""

from importlib import resources

# The API's source, shipped as package data: `tandem proto` prints it, for clients in
# other languages.
PROTO_RESOURCE = resources.files("tandem.cluster").joinpath("proto/tandem/v1/tandem.proto")

# The port `tandem serve` listens on for gRPC and `tandem client` connects to by default.
DEFAULT_GRPC_PORT = 50051
