"""Model code: Llama decoder, LoRA/MoGE adapters, graph tower, projector. Names logical axes only."""
