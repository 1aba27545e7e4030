"""Training: CLI, loop, jitted step, config, shard reader, sharding, processes, reporting."""
