"""GPT-2 124M on tiny shakespeare with the GPT-2 BPE (tiktoken `gpt2`).
Batch: 12 x 1024 on CUDA, 2 x 128 on CPU (the preset's defaults)."""
dataset = "shakespeare"
preset = "gpt2"
out_dir = "out/gpt2"
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 6e-4
min_lr = 6e-5
beta2 = 0.95
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 10
