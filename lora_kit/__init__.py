"""Learn and use LoRA on LLaMA-2: literate notebooks that derive, build, measure and fine-tune low-rank adapters

Modules:

- `lora_kit.data`: Load instruction data with `datasets` (local JSON/JSONL/CSV or a hub name), turn each example into one prompt with a LLaMA-2 chat, Alpaca or plain template, and tokenize it so the loss falls on the response only.
- `lora_kit.tiny`: A 3.2-million-parameter `LlamaForCausalLM` with its own BPE tokenizer, pretrained on CPU on generated English and Indonesian sentences, and a translation task it cannot do until LoRA teaches it."""

__version__ = "0.0.1"
