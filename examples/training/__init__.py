"""Training drafters (DSpark, DFlash, Eagle3) for a real target on CPU; see examples/train_drafter.py.

Modules:
- `target`: load the target (transformers) and its tokenizer, offline.
- `data`: training prompts (ShareGPT first human turns) and the target's own responses (cached).
- `features`: teacher-forced target forwards -> context features + top-k next-token log-probs (cached).
- `forward`: batched training forwards built from the product's drafter modules (many anchors per
  sequence for DSpark/DFlash; training-time-test unrolling for Eagle3).
- `losses`: DeepSpec's loss (CE + L1/TV + confidence BCE, position weights exp(-k/4)).
- `sampled_vocab`: `--vocab-sample N`, a sampled-softmax LM head for the block drafters (training speed).
- `export`: config.json + model.safetensors in DeepSpec's format (bf16, without embed/lm_head).
- `corpus`: the self-distillation data engine (training-only prompts answered by the target in
  SGLang's CPU engine; checksummed token-id shards, committed under `corpus/`).
- `corpus_features`: target features of a corpus, cached per shard and memory-mapped (`ShardedFeatureSet`).
- `train_state`: resumable training state (weights, AdamW moments, random streams) in safetensors/JSON.
"""
