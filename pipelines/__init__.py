"""Ray glue around the `statekv` library: the indexing pipeline and the query service."""
