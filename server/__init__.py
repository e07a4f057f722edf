"""OpenAI-compatible HTTP server (Sanic) over the shared pipeline."""
