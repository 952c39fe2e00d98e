# The shipped 1,024 key model taught 2,000 steps more with a tune clock and a tune length (docs/conditioning.md, "The
# shipped length model"): each position knows how long its tune has run and, where the window shows the tune's end,
# how long it has left; generate.py --seconds asks a length, and asked none, generate.py and evaluate.py ask each
# tune the length of a training tune of its style (the run stores them in the checkpoint).
# Applied on top of config/conditioned_cpu.py, config/conditioned_key_cpu.py, config/conditioned_key_long_cpu.py
# and config/conditioned_key_1024_cpu.py:
#   python custom_training.py config/conditioned_cpu.py config/conditioned_key_cpu.py \
#       config/conditioned_key_long_cpu.py config/conditioned_key_1024_cpu.py config/conditioned_key_length_cpu.py
init_from = './models/conditioned_key_1024_cpu.pt'
tune_clock = True
tune_length = True
lr = 1e-4
min_lr = 1e-5
max_steps = 2000
# told a length, a tune ends near it; the end at 2 then ends more tunes on the tonic than real tunes do (11 points
# over their share, docs/conditioning.md), at 1.5 within 10 points
end_guidance = 1.5
save_dir = './content/checkpoints/conditioned_key_length_cpu'
samples_dir = './content/samples/conditioned_key_length_cpu'
