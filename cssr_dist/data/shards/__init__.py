"""The WebDataset shard format: the index (`index`), tar reading (`tar`) and one sample's
decoding (`samples`). Read by the shard reader (data/readers/shards.py), written offline by
`cssr-make-shards` (cssr_dist/apps/make_shards/).

Import the submodule you need: the package imports nothing, so `tar`, `index` and the
split readers stay free of torch (a tool that only reads an index starts in 0.1 s, not 6 s)."""
