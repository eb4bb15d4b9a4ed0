"""The OpenAI-compatible HTTP API (FastAPI; app.py builds it over a GenerationBackend).

Its requests are checked and converted by the layer the gRPC API uses too
(cluster/api/prepare.py in, cluster/api/chat_stream.py out); this package holds only
what is OpenAI-shaped: request bodies (schema.py), the routes' objects and events
(chat.py, completions.py, responses.py), errors and streaming (app.py).
"""
