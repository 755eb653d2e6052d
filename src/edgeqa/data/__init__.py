"""Data: the synthetic generator (`synth`), dataset adapters into the manifest (`ingest`), the manifest schema and
reference answers (`manifest`), mask facts and reference reasons (`maskfacts`), Great Expectations suites
(`validate`), and synthetic defects pasted onto real images (`paste`)."""
