# The shipped long key model taught 4,000 steps more on windows of 1,024 tokens (docs/conditioning.md): a window
# holds a whole Irish or Scottish tune with its repeats, up to generate.py's cap of 1,035 tokens, so the model sees
# where each tune it learns from ends. Applied on top of config/conditioned_cpu.py, config/conditioned_key_cpu.py
# and config/conditioned_key_long_cpu.py:
#   python custom_training.py config/conditioned_cpu.py config/conditioned_key_cpu.py \
#       config/conditioned_key_long_cpu.py config/conditioned_key_1024_cpu.py
init_from = './models/conditioned_key_long_cpu.pt'
seq_len = 1024
batch_size = 4  # the same 4,096 tokens a step as the recipes it builds on
lr = 1.5e-4
min_lr = 1.5e-5
warmup_steps = 50
max_steps = 4000
save_dir = './content/checkpoints/conditioned_key_1024_cpu'
samples_dir = './content/samples/conditioned_key_1024_cpu'
