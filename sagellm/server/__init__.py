"""The HTTP side: Flask app factory, routes, JSON errors, SSE responses, health and metrics."""
