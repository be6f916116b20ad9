# A control adapter on the CPU quickstart's generator: draw the caption's colours in the shape an edge map gives.
#   python train_control.py config/shapes_edges.py  (after the quickstart: out-shapes-vae, out-shapes-flow)
#   python sample.py config/shapes_edges.py --control_image photo.png --prompt "a red square on a blue background"
#   python eval_shapes.py config/shapes_edges.py    (control-following, held out)
# --control=silhouette trains on the shape's silhouette instead (set out_dir apart).
if script == 'train_flow':  # the adapter trains with its own script
    raise SystemExit("error: config/shapes_edges.py trains a control adapter; run "
                     "python train_control.py config/shapes_edges.py")
if script in ('train_control', 'sample', 'eval_shapes', 'export_mobile'):
    out_dir = 'out-shapes-edges'
if script == 'train_control':
    base_dir = 'out-shapes-flow'
    control = 'edges'
    caption_conflict = 0.9  # most captions name another type, size and place than the map: the map must win
    num_images = 20000  # the data and r are the base run's but for this: its docs/results.md rows trained on 20,000
    cfg_dropout = 0.1
    batch_size = 64
    lr = 2e-3
    min_lr = 1e-4
    warmup_steps = 50
    max_steps = 9000
    eval_interval = 1000
if script == 'eval_shapes':  # the base model's adherence at its sampling settings, then the control table
    iters_list, steps_list, inpaint = (2,), (25,), False
