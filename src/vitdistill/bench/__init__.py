"""Benchmarks shipped with the package, run by ``vitdistill bench ...``; the scripts in benchmarks/ call the package API
(benchmarks/README.md says which lives where)."""
