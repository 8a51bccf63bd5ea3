"""Constants shared by data, model and evaluation code."""

# Sentinel id for graph-token slots. The data pipeline expands the single `<image>` placeholder of a
# prompt into one slot per heavy atom, so the spliced sequence has a static length under jit. The id is
# negative (as in LLaVA) so that no real tokenizer vocabulary has to change.
IMAGE_TOKEN_ID = -200
# Label value for positions that carry no loss (prompt, graph tokens, padding).
IGNORE_INDEX = -100
# Llama-3 `<|finetune_right_pad_id|>`, the pad id the Omni-Mol checkpoints use.
LLAMA3_PAD_TOKEN_ID = 128004
IMAGE_PLACEHOLDER = "<image>"
