"""Stage `recover`: finish what killed stage processes left, so that a rerun is whole even when
DVC restores every other stage from its run-cache.

Reads `.pipeline/running/` (the marks of stage processes, `src.outputs.running`), `paths`
(where temp folders are left) and `tracking` (the MLflow store). A killed stage's MLflow run
ends as the stage would have ended it: FINISHED with its registered version's alias (champion
or candidate) when the version was registered, else KILLED. Temp folders of processes that no
longer run are removed, and the marks cleared. Writes no output of its own: DVC runs it when
the marks folder changed, which happens only when a stage was killed. Every other stage does
the same before it starts.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from src.stages import stage

log = logging.getLogger(__name__)


@stage.reads("paths", "tracking")
def run(cfg: DictConfig) -> dict:
    """Finish the MLflow runs of killed stages, remove their temp folders, clear their marks."""
    done = stage.recover(cfg)
    if not done["killed_stages"] and not done["removed"]:
        log.info("no killed stage left anything to finish")
    return done


if __name__ == "__main__":
    stage.main("recover", run, summary=False)
