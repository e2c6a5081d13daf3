"""Routers: which shard learned what a request asks about. Every router's files are built from
one shard's own rows, so a forget that changes a shard changes only its router files."""
