"""A driver process for the Slurm tests: ``python driver.py MODE JOBS``.

Starts :func:`pipeline.cluster.clients.slurm_client` with no settings of ours, so everything comes
from the dask-jobqueue configuration in the environment (``DASK_JOBQUEUE__SLURM__*``), runs
20 small tasks and prints one JSON line: where each ran and the job ids submitted.
MODE ``done`` then leaves the context; ``wait`` prints ``READY`` and blocks on one long task
per job until a signal ends it.
"""

from __future__ import annotations

import json
import sys
import time

from pipeline.cluster.clients import slurm_client


def where(_: int) -> dict:
    import os
    import socket

    import pipeline

    time.sleep(0.1)
    return {
        "job": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
        "pipeline": pipeline.__file__,
    }


def main() -> None:
    mode, jobs = sys.argv[1], int(sys.argv[2])
    with slurm_client(None, jobs=jobs) as client:
        results = client.gather(client.map(where, range(20)))
        submitted = sorted(client.cluster.submitted)
        print(json.dumps({"results": results, "submitted": submitted}), flush=True)
        if mode == "wait":
            print("READY", flush=True)
            client.gather(client.map(time.sleep, [600] * jobs, pure=False))


if __name__ == "__main__":
    main()
