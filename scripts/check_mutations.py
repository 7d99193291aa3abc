"""Mutation check of the engine tests: apply one plausible bug at a time, run the given tests, restore.

    .venv/bin/python scripts/check_mutations.py tests/test_engine_pins.py tests/test_engine.py tests/test_resume.py -k "not killed_job"

Prints CAUGHT (some test failed) or MISSED per mutation. Edits source files while it runs: use a clean tree.
"""
import subprocess, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
M = {
 "predict_returns_last": ("scopevid/engine/rollout.py", "        out = {f: self.predict(hist.get(f), levels[f][0]) for f in active}", "        out = {f: hist.last(f) for f in active}"),
 "resume_drops_policy": ("scopevid/engine/state.py", "        for name, c in self.components.items():\n            c.load_state_dict(", "        for name, c in self.components.items():\n            if name == 'policy': continue\n            c.load_state_dict("),
 "resume_drops_features": ("scopevid/engine/state.py", '        self.features.load_state_dict(to_device(state["features"], device))', '        pass'),
 "resume_drops_history": ("scopevid/engine/state.py", '        self.history.load_state_dict(to_device(state["history"], device))', '        pass'),
 "stability_ignored": ("scopevid/engine/rollout.py", "        ok, scale = self.stability.verdict(delta_sq, ref_sq, bad)\n", "        ok, scale = True, 1.0\n"),
 "kv_never_evicted": ("scopevid/engine/kvcache.py", "        for f in [f for f in self._frames if f < frame]:\n            del self._frames[f]", "        pass"),
 "sums_float32": ("scopevid/engine/history.py", ".double()", ".float()"),
 "history_not_pruned": ("scopevid/engine/state.py", "        self.history.drop_before(frame)\n", ""),
 "features_not_pruned": ("scopevid/engine/state.py", "        self.features.drop_before(frame)\n", ""),
}
tests = sys.argv[1:]
for name, (path, a, b) in M.items():
    p = ROOT / path
    src = p.read_text()
    assert src.count(a) >= 1, (name, src.count(a))
    p.write_text(src.replace(a, b))
    try:
        r = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                           cwd=ROOT, capture_output=True, text=True, timeout=1200)
        tail = [l for l in r.stdout.splitlines() if l.startswith("FAILED")][:2]
        print(f"{name:24s} {'CAUGHT' if r.returncode else 'MISSED'} {tail}", flush=True)
    finally:
        p.write_text(src)
