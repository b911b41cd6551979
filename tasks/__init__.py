"""The stages, one module each (spec, build, task). Importing the package registers every stage's
spec function (`fasttrack.core.stage.SPECS`), which the model chain uses to compute keys."""

from tasks import base, data, dpo, evaluate, export, pack, pretrain, rag, report, sft

__all__ = ["base", "data", "dpo", "evaluate", "export", "pack", "pretrain", "rag", "report", "sft"]
