# Several parts on a plain CPU: config/quick_cpu.py's 128-wide model with dropout on the bundled chorales and string
# quartets, every note with its role: the first of models/parts_cpu.pt's two steps, config/parts_own_cpu.py the
# second (docs/parts.md, "The shipped parts model and its recipe").
#   python custom_training.py config/parts_cpu.py [--field value ...]
data_path = './content/parts_dataset'  # 402 Bach chorales and 46 string quartet files, four parts each
tracks = 'parts'  # melody, bass, harmony and drums, each in its own block of pitch ids
dim = 128  # at equal CPU time 128 wide ties 192 wide, at half the step cost and file size
depth = 4  # 6 layers were worse at equal steps
heads = 2
dim_head = 64
prev_tokens = 9  # as the quick recipe: the embeddings of the 3 notes before each position help copying
seq_len = 256
batch_size = 16
grad_accum = 1
pack = True
tune_mask = True
dropout = 0.1  # the 0.85M training tokens are read about 11 times: 0.04 lower validation NLL than without
lr = 2e-3  # 3e-3 was worse at equal steps
lr_schedule = 'cosine'
warmup_steps = 50
min_lr = 1e-4
max_steps = 3400  # about 0.25 s a step on 2 quiet cores: 14 minutes of steps (docs/parts.md)
validate_every = 400  # 24 held-out files, 29k tokens: a second or two each
val_tokens = None  # the whole held-out split: a step here trains on thousands of tokens, so validation stays small
generate_every = 2000
save_every = 500
generate_length = 512
