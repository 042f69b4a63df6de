"""The model gateway: Ollama- and OpenAI-compatible requests served by whichever managed model
they name, made resident on demand (``scheduler`` decides, ``service`` applies)."""
