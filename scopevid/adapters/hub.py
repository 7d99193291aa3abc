"""Loading Hugging Face components (diffusers, transformers) as the CLI reports: quietly.

Their "Loading weights" bars go to stderr, where a scopevid command writes one line on failure and
nothing else; the run's own progress says what is happening.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager


@contextmanager
def quiet_progress():
    """The progress bars of diffusers and transformers (those already imported: the caller imported
    what it loads with) off while the block runs, as they were after."""
    libs = [importlib.import_module(f"{name}.utils.logging") for name in ("diffusers", "transformers") if name in sys.modules]
    before = [(m, m.is_progress_bar_enabled()) for m in libs]
    for m in libs:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in before:
            if on:
                m.enable_progress_bar()
