"""Released and exported weights on storage, loaded into the modules of `trainer/models/`.

One home for every loader of weights someone else (or an earlier run) wrote: image tokenizers and
their ecosystem converters (`image_tokenizers`, `converters`), diffusers Stable Diffusion pipeline
folders (`diffusers_sd`), open_clip models (`clip_models`), and the read side of the run layout
(`runs`: which checkpoint of a run holds exported weights).

The import rule (tests/test_layout.py): this package imports only `trainer.models`,
`data_pipeline.fs` (storage), `data_pipeline.config` (the config machinery) and external libraries,
so data jobs (`data_pipeline/`) may use it without pulling in the trainer. Loaders read weights
only (safetensors, or `torch.load(weights_only=True)`) and check every name strictly.
"""
