"""GPT-2 medium (355M) on tiny shakespeare with the GPT-2 BPE (tiktoken `gpt2`).
Batch: 12 x 1024 on CUDA, 1 x 128 on CPU (the preset's defaults)."""
dataset = "shakespeare"
preset = "gpt2-medium"
out_dir = "out/gpt2-medium"
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 3e-4
min_lr = 3e-5
beta2 = 0.95
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 10
