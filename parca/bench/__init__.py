"""Benchmarks and reports: cost curves, serving load, document runs (see also the scripts in benchmarks/)."""
