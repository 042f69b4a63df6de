"""Model backends: Ollama (HTTP), an in-process torch module, a model-server process."""
