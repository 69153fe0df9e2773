"""llorch inference: the pinned GGUF model catalog and the deterministic llama.cpp engine.

Imports nothing else of llorch.
"""
