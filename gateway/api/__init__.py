"""The HTTP surface: OpenAI request and response shapes, the FastAPI app and its handlers, /metrics."""
