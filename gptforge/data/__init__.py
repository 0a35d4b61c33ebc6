"""Data pipeline: read sources, tokenize them into binary shards, and load sequences back for training.

`sources` turns files/folders/JSONL/Parquet/hf:/builtin: into documents; `prepare` tokenizes them with many
processes into shards (`shards` defines the on-disk format); `loader` serves (x, y) batches from memory-mapped
shards in a seeded, resumable, rank-partitioned order.
"""
