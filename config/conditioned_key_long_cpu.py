# The shipped long key model's recipe (models/conditioned_key_long_cpu.pt; docs/conditioning.md, "The shipped key
# model"): the shipped key model taught 6,000 steps more on windows of 512 tokens, which hold a whole Irish or
# Scottish part and its repeat (a window of 256 holds about 85 notes), at a lower peak. Applied on top of
# config/conditioned_cpu.py and config/conditioned_key_cpu.py:
#   python custom_training.py config/conditioned_cpu.py config/conditioned_key_cpu.py config/conditioned_key_long_cpu.py
init_from = './models/conditioned_key_cpu.pt'
seq_len = 512
batch_size = 8  # the same 4,096 tokens a step as the first two steps
lr = 2e-4
min_lr = 2e-5
warmup_steps = 50
max_steps = 6000
save_dir = './content/checkpoints/conditioned_key_long_cpu'
samples_dir = './content/samples/conditioned_key_long_cpu'
