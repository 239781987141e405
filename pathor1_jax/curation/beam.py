"""The Apache Beam runner of the unit steps (extract, filter, qc): the same unit functions as the
local process pool, so the shards, and the merged outputs built from them, are byte-identical.

    pathor1 curate extract --in pdfs/ --out out/ --runner beam -- --runner=DirectRunner
    pathor1 curate extract --in /mnt/pdfs --out /mnt/out --runner beam -- \\
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp \\
        --requirements_file=requirements.txt --num_workers=50

The pipeline is `Create(units) | Reshuffle | Map(run unit, write its shard)`; the driver then merges
the shards exactly as the local runner does. Units whose shard already exists are not sent (a rerun
resumes). On Dataflow, Flink or Spark the workers must see `--in` and `--out` as the same paths
(a shared filesystem such as a Filestore/NFS or gcsfuse mount); see README, Curation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .io import Unit, UnitFn, save_unit, shard_path


class _RunUnit:
    """A picklable DoFn body: run one unit and write its shard; yields the unit's name."""

    def __init__(self, fn: UnitFn, out_dir: str, step: str):
        self.fn, self.out_dir, self.step = fn, out_dir, step

    def __call__(self, unit: Unit) -> str:
        rows, report = self.fn(unit)
        save_unit(self.out_dir, self.step, unit, rows, report)
        return unit.name


def run_beam(fn: UnitFn, units: Sequence[Unit], out_dir: str, step: str, pipeline_args: list[str]) -> None:
    """Run the unfinished `units` of `step` as a Beam pipeline with `pipeline_args` (runner flags)."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError as e:
        raise ImportError("--runner beam needs apache-beam: pip install 'pathor1_jax[beam]'") from e
    todo = [u for u in units if not os.path.exists(shard_path(out_dir, step, u))]
    if not todo:
        return
    options = PipelineOptions(pipeline_args or ["--runner=DirectRunner"])
    with beam.Pipeline(options=options) as p:
        _ = (
            p
            | "Units" >> beam.Create(todo)
            | "Spread" >> beam.Reshuffle()
            | f"Run {step}" >> beam.Map(_RunUnit(fn, os.path.abspath(out_dir), step))
        )
