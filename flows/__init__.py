"""Prefect flows of the project: `pipeline` (the DVC stages as Prefect tasks). They orchestrate and never
re-implement a stage; the `edgeqa` CLI imports them from the project root at run time."""
