"""WHERE it runs: process groups, sequence parallelism over frames, consensus (DESIGN.md).

- `groups`: process group from the launcher's environment (torchrun, Ray, Slurm), gloo/nccl, collective
  timeout, clean teardown; `ParallelState`, one rank's place in the mesh (its layout is scopevid.mesh)
  with its process groups, built once.
- `sequence`: `MeshTopology`, the engine's Topology for N ranks (frame shards, Ulysses attention,
  velocity gather, per-frame state hand-over).
- `consensus`: float64 sums identical on every rank; decision digests cross-checked in debug.
- `worker`: `run_rank` / `run_from_env`, one rank of a generation (torchrun, Ray, Slurm all call it).
- `launch`: run a function on N local ranks (tests, benchmarks).
"""
