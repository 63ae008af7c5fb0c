"""Continuous-batching engine: requests in, token events out. Knows nothing of HTTP.

Import the submodules directly: `events` and `sampling_params` are torch-free so the API layer
can use them; `engine` pulls in torch.
"""
