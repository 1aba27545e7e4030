"""The shared contract of the two halves: shard format, storage (local/S3), constants."""
