# CPU quickstart: 64x64 procedural shapes (embedded, offline), a tiny VAE; minutes on 2 cores.
#   python train_vae.py config/shapes.py
# A real folder of captioned images instead: add --data_dir=PATH (images + metadata.jsonl).
dataset = 'shapes'
image_size = 64  # -> 4x4x16 latents

if script == 'train_vae':
    out_dir = 'out-shapes-vae'
    num_images = 20000
    channels = (32, 64, 128)
    batch_size = 32
    max_steps = 1600
    eval_interval = 400
