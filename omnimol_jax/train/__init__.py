"""Training: `omnimol train` (stage 1 projector alignment, stage 2 MoGE SFT)."""
