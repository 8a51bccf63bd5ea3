"""Where a run's language model and its tokenizer come from: `init.hf` (a HF Llama folder), `init.gguf` (a GGUF
file or a packaged model, imported once into the user cache), `init.checkpoint` (an omnimol checkpoint), or none
(random initialisation).

The tokenizer is the backbone's own unless `data.tokenizer` names one: a pretrained model only understands the
ids of the tokenizer it was trained with. A random backbone reads `<data_dir>/tokenizer` (what build-data writes).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from omnimol_jax.checkpoint import ASSETS_DIR
from omnimol_jax.config import DataConfig, InitConfig

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Backbone:
    kind: str                    # "hf" | "gguf" | "checkpoint" | "random"
    weights: Optional[Path]      # the HF folder (hf) or the omnimol checkpoint (gguf, checkpoint)
    tokenizer: Optional[Path]    # the folder holding its tokenizer.json, None when it has none


def _with_tokenizer(folder: Path) -> Optional[Path]:
    return folder if (folder / TOKENIZER_FILE).is_file() else None


def resolve_backbone(init: InitConfig, progress: bool = True) -> Backbone:
    """The run's language-model source; a GGUF source is imported into the user cache the first time."""
    if init.hf:
        return Backbone("hf", Path(init.hf), _with_tokenizer(Path(init.hf)))
    if init.gguf:
        from omnimol_jax.convert.gguf_llama import imported_gguf

        checkpoint = imported_gguf(init.gguf, progress=progress)
        return Backbone("gguf", checkpoint, _with_tokenizer(checkpoint / ASSETS_DIR))
    if init.checkpoint:
        return Backbone("checkpoint", Path(init.checkpoint), _with_tokenizer(Path(init.checkpoint) / ASSETS_DIR))
    return Backbone("random", None, None)


def tokenizer_folder(data: DataConfig, backbone: Backbone) -> Path:
    """`data.tokenizer` when given, else the backbone's tokenizer, else `<data_dir>/tokenizer`."""
    if data.tokenizer:
        return Path(data.tokenizer)
    return backbone.tokenizer or data.tokenizer_path()
