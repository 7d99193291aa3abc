"""HOW a rollout runs on one rank group: the loop, the solver, caches and outputs."""
