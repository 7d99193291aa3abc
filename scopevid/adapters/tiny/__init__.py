"""The bundled tiny AR video DiT: model (model.py) and adapter (adapter.py)."""
