# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test venv clean

# Every integration, with the exact pins of the development stack (constraints/cpu.txt); the package
# itself asks only for ranges (pyproject.toml). deepspeed: the reference of tests/test_ulysses.py.
$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -c constraints/cpu.txt -e '.[all,deepspeed,test]'
	touch $(STAMP)

venv: $(STAMP)

# 257 frames with the bundled model, SCOPE-fast against Original: video, run log, summary.
demo: $(STAMP)
	$(PY) -m scopevid generate --config configs/tiny.yaml --frames 257 --policy scope-fast --compare --out out/demo --overwrite --no-progress

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf out .pytest_cache .hypothesis
