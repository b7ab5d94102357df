"""`t2i preprocess`: raw WebDataset shards -> validated, filtered, scored, deduplicated shards.

    job.py      the plan (score, dedup, write, finalize) and its Ray tasks: `run_preprocess`
    config.py   PreprocessConfig, the job's schema
    dedup.py    exact and near-duplicate detection (LSH over CLIP embeddings)

Resuming, the one commit of a part and the fault hook are shared with `t2i tokenize` in
data_pipeline/resumable.py; column names in data_pipeline/columns.py.
"""
