"""The offline index build: list a collection, embed it, write an index bundle."""
