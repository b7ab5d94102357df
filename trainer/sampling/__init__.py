"""`t2i sample`, one module per recipe and the pieces they share.

    config.py   SampleConfig (both recipes), prompts
    common.py   per-candidate seeds, chunks of (prompt, candidate) rows, CLIP rerank, outputs
    ar.py       DALL-E: top-k/top-p code sampling with a KV cache
    ldm.py      latent diffusion: DDIM/DDPM with classifier-free guidance, KL-AE decode
    run.py      the recipe registry; in-process and Ray-actor-sharded runs
"""
