"""Plumbing, what a reader of the paper can skip: what a real tool needs beyond the card's files:

    checkpoints  safetensors files: SD3.5 / diffusers / DiT4SR layouts, key and shape checks, atomic saves
    images       image files in and out (16-bit, alpha, gray, EXIF, size limits), finding inputs
    tiling       the VAE's tiles (shared GroupNorm statistics) and the sampler's latent tiles
    pairs        training images and the (gt, lr) pairs made from them in worker processes
    runs         seeds per (seed, step, rank), the latent cache, processes, checkpoints and resume, logs
    cli          flags from a config, progress with an ETA, the device, peak memory
Imports run one way: these never import train.py or sample.py (tests/test_layout.py).
"""
