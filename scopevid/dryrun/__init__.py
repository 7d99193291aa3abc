"""Full-size dry runs without allocating: the real adapters and engine on torch's meta device.

`meta.MetaRun` answers the value questions meta tensors cannot (a checked sum, a mask's nonzeros)
with fixed choices and tracks the bytes of every tensor alive; `window.dry_run` runs one window of a
config through the engine under it; `planner` turns that into per-rank memory, FLOPs and traffic.
"""
