"""The pre-forward signals a policy can take its discrepancy (Eq. 4) on.

The shared vocabulary between policies (which name the signal they decide on) and adapters (which
declare the signals they can compute, `adapters.base.Capabilities.features`): an enum here, at the
bottom of the import graph, so both sides name the same thing and neither probes the other.
"""

from __future__ import annotations

from enum import Enum


class Feature(str, Enum):
    HOST = "host"  # adapter.host_feature: SCOPE's signal; every adapter has it
    TEMB = "temb"  # timestep embedding per frame (TeaCache's e)
    TEMB_MOD = "temb_mod"  # its adaLN projection (TeaCache's e0 with ret-steps)
    EMBED = "embed"  # patch-embedded input (FlowCache's MAGI-1 signal)
