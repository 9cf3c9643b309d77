"""The compressed checkpoint format (docs/CHECKPOINT.md names the module of each part).

- ``manifest``: the schema and its limits; ``read_manifest`` reads and checks it once per load;
- ``expected``: what the model config implies (experts, shapes), checked against the manifest;
- ``matrices``: how a quantized matrix is stored, checked and opened again (one path);
- ``shards``: writing, verifying (one checksum verifier) and streaming shards with read-ahead;
- ``sizes``: the one size accounting (the job's report and ``inspect``).

Below it: ``qmoe_ray.storage`` (fsspec, the safetensors parser), ``models``, ``quant``, ``codec``;
above it, the readers (``qmoe_ray.read``) and the writer (``qmoe_ray.job``).
"""
