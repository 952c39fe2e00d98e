# The shipped key model's recipe (models/conditioned_key_cpu.pt; docs/conditioning.md, "The shipped key model"): the
# shipped conditioned model taught each pitch's degree in the asked key (tune_key) with the loss against ending off
# the tonic, 3,000 steps at a tenth of the first step's peak. Applied on top of config/conditioned_cpu.py:
#   python custom_training.py config/conditioned_cpu.py config/conditioned_key_cpu.py
init_from = './models/conditioned_cpu.pt'
tune_key = True
tonic_ending_loss = 10.0  # guided at 2.5, 61.3% of the tunes end on the tonic against 55.7% with 3
lr = 3e-4
min_lr = 3e-5
warmup_steps = 50
max_steps = 3000
# its samples, and generate.py's and evaluate.py's where not told otherwise: the notes lean on the header at 3
# (the key and the meter read as asked; 2.5 leaves the meter short), the end at 3.5 (tunes that end on the tonic at
# the held-out length; 4 leaves some tunes short)
guidance = 3.0
end_guidance = 3.5
save_dir = './content/checkpoints/conditioned_key_cpu'
samples_dir = './content/samples/conditioned_key_cpu'
