"""The teacher: the local model (`local`: Lite0 -> projector -> SmolLM2 + LoRA, with anomaly evidence), the
zero-shot `hf` and `openai` backends (`backends`), its domain SFT (`sft`) and the resumable labelling (`label`)."""
