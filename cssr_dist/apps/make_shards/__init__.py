"""`cssr-make-shards`, the offline half of the shard format: raw data set -> WebDataset shards.

`cli.py` (the command line, the plan, `--verify`) and `writer.py` (encoding, one shard);
the listings of on-disk layouts are the native reader's own (data/layouts.py), and the
format itself (index, tar, samples) is data/shards/. Nothing in a training run imports this.
"""
