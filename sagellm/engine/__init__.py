"""The engine layer: requests in, token events out. Knows nothing of HTTP.

`client` (the EngineClient the API layer talks to), `events` and `sampling_params` are torch-free
so the API layer can use them; `builder.build_engine` builds our own engine behind it, and
everything else pulls in torch. Import the submodules directly.
"""
