"""Where official and trained checkpoints live, and the code that fetches and opens them.

    read_safetensors / write_safetensors   the safetensors format, by hand (safetensors_format.py)
    load_state_dict / load_checkpoint      PyTorch pickles without running their code (readers.py)
    save_checkpoint                        atomic torch.save for this project's own checkpoints
"""
from .readers import (Placeholder, UnsafeCheckpointError, load_checkpoint, load_state_dict,
                      save_checkpoint)
from .safetensors_format import read_safetensors, read_safetensors_metadata, write_safetensors

__all__ = ["read_safetensors", "read_safetensors_metadata", "write_safetensors", "load_state_dict",
           "load_checkpoint", "save_checkpoint", "UnsafeCheckpointError", "Placeholder"]
