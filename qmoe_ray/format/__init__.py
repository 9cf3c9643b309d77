"""The compressed checkpoint format (docs/CHECKPOINT.md): the manifest schema, stored matrices and
shards."""
