"""Checkpoint I/O in HF naming and torch layout: GGUF files and HF safetensors directories.

Both formats open as lazy tensor sources (`GGUFSource`, `SafetensorsSource`:
HF names, shapes, and `read(name, block)`), which `io.sharded_load.load_weights`
turns into sharded `Weights` reading only each device's blocks. `load_gguf` and
`read_hf_dir` read everything into {HF tensor name: numpy array} instead.
"""

from diffmas_jax.io.gguf import (GGUFModel, GGUFSource, default_gguf_path, load_gguf,
                                 load_gguf_tokenizer)
from diffmas_jax.io.safetensors_io import (CheckpointFileError, SafetensorsSource, open_hf_dir,
                                           read_hf_dir, write_hf_dir)

__all__ = ["CheckpointFileError", "GGUFModel", "GGUFSource", "SafetensorsSource",
           "default_gguf_path", "load_gguf", "load_gguf_tokenizer", "open_hf_dir", "read_hf_dir",
           "write_hf_dir"]
