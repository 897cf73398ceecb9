"""WebDataset shards: the index (`index`), tar reading (`tar`), writing (`writer`), raw
listings of on-disk data sets (`listings`), the rank/worker-aware stream (`stream`) and the
command line behind `tools/make_shards.py` (`cli`).

Import the submodule you need: the package imports nothing, so `tar`, `index` and the
split readers stay free of torch (a tool that only reads an index starts in 0.1 s, not 6 s)."""
