"""`t2i tokenize`: clean shards -> a token dataset (DALL-E codes + BPE ids, or LDM latents +
text states), offline, deterministic and resumable.

    job.py      the plan (captions, text tokenizer, parts, shards, manifest): `run_tokenize`
    config.py   TokenizeConfig, the job's schema
    stages.py   the Ray Data stages: image decode, image tokenizer / text encoder actor pools
    writer.py   output shards from committed parts, and the output's columns

Resuming, the one commit of a part and the fault hook are shared with `t2i preprocess` in
data_pipeline/resumable.py; column names in data_pipeline/columns.py.
"""
