"""Benchmarks shipped with the package (``vitdistill bench ...``); scripts in benchmarks/ call them."""
