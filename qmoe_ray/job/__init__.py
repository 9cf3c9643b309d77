"""The write side: a compression job (config, the per-group numerics, the driver, the Ray actors,
progress records, the report). The only package that imports Ray."""
