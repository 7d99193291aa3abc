"""Original: every iteration is a full forward, the reference every speedup is measured against."""

from scopevid.scheduler.policies.base import Decision, Mode, Policy, StepContext


class Original(Policy):
    name = "original"
    needs_feature = False

    def decide(self, ctx: StepContext, disc=None) -> Decision:
        return Decision(Mode.RECOMPUTE, reason="original")
