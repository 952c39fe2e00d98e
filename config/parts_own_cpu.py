# The shipped parts model's second step (docs/parts.md, "The shipped parts model and its recipe"): config/parts_cpu.py's
# model fine-tuned on the bundled set, 1,200 pieces of its own and its accompaniments of the training melodies
# (tools/own_tunes.py) with the voice-leading term, so that the model alone keeps the rule against parallel fifths and
# octaves, in its own pieces and against a given melody. Applied on top of config/parts_cpu.py:
#   python custom_training.py config/parts_cpu.py config/parts_own_cpu.py
init_from = './content/checkpoints/best.pt'  # the first step's best checkpoint (config/parts_cpu.py's save folder)
data_path = './content/own_parts'  # the bundled zip, the model's own pieces and accompaniments, side by side
lr = 5e-4  # a quarter of the first step's: the model has learnt the music, the term reshapes it
min_lr = 5e-5
voice_leading_loss = 2.0  # 1 left 0.15 parallels per 100 notes; 3 left accompaniments 11% less consonant than Bach
voice_leading_floor = 1e-4  # log p pushed down to log 1e-4: a pull that does not fade as p gets small
save_dir = './content/checkpoints/parts_own'
samples_dir = './content/samples/parts_own'
