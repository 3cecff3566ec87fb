"""The SLURM launcher (hydra/launcher=submitit_slurm; Hydra takes launchers only from the
hydra_plugins package): hydra-submitit-launcher's, made to wait for how each job finally ends.

A job that SLURM preempts or requeues (`scontrol requeue`, or normlab's own requeue on the
time-limit warning signal, see `normlab.run.signals`) saves `checkpoints/last.ckpt` in its job
dir and exits *without* a result for submitit; SLURM runs it again, in the same job dir, and it
resumes from that checkpoint (`normlab.run.resume.own_checkpoint`, loaded weights-only). The
sweep command waits on submitit for the result of the attempt that ends the job, so summary.md
and the exit code describe how each job finally ended.

A job that ends with no result at all (cancelled, out of memory, node failure) is recorded as
failed in its metrics.json (when the job did not write one) instead of a traceback that would
end the sweep before the other jobs are counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)
from omegaconf import OmegaConf

from normlab.config import one_line

log = logging.getLogger("normlab")


class SlurmLauncher(_SubmititSlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher; `launch` waits for every job's final outcome and
    turns a job that ended without a result into a failed row, not a traceback."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Never called: normlab handles the preemption signal itself (see module docstring)."""
        return super().checkpoint(*args, **kwargs)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and len(job_overrides) > 0
        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params.get("max_num_timeout", 0),
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            key if key in base else f"{self._EXECUTOR}_{key}": value
            for key, value in self.params.items() if key not in init_keys
        })
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        params: list[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                           Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*params, strict=True))
        return [
            self._outcome(job, p[0], sweep_dir / str(p[2]))
            for job, p in zip(jobs, params, strict=True)
        ]

    @staticmethod
    def _outcome(job: Any, overrides: list[str], job_dir: Path) -> JobReturn:
        """The job's JobReturn once SLURM is done with it (requeued attempts included)."""
        try:
            return job.results()[0]
        except Exception as error:  # the job ended with no result: cancelled, killed, ...
            state = getattr(job, "state", "?")
            message = f"SLURM job {job.job_id} ended {state} without a result: {one_line(error)}"
            log.error("normlab: %s", message)
            _record_failure(job_dir, message, overrides)
            failed = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
            failed.return_value = float("nan")
            return failed


def _record_failure(job_dir: Path, message: str, overrides: list[str]) -> None:
    from normlab.results.runs import METRICS_FILE, write_metrics

    if (job_dir / METRICS_FILE).is_file():
        return  # the job recorded how it ended (interrupted, failed) itself
    job_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(job_dir, {"status": "failed", "error": message, "overrides": overrides})
