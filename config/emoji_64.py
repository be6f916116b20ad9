# Stage 2 of config/emoji.py: its generator trained from scratch at 64 px (4x4 latents, 16
# tokens, a fraction of a 128 px step's time: docs/results.md); stage 3 continues it at 128 px.
#   python train_flow.py config/emoji.py config/emoji_64.py
if script == 'train_flow':
    out_dir = 'out-emoji-flow-64'
    init_from = 'scratch'
    image_size = 64
    max_steps = 2000
    eval_interval = 500
