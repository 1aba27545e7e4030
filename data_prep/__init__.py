"""Data stage: license filtering, captioning and encoding images into webdataset shards."""
