"""Everything about answering requests: the served folder, loading models, routing a request to
the shard that learned what it asks about, and generating answers."""
