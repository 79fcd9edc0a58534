"""Checkpoint formats, one home: Hugging Face safetensors (sharded, FP8 block scales), localglm
quantized directories, GGUF files (read and written), and the memory maps under all of them.

Every reader is a `TensorSource` (source.py): names, shapes and dtypes without reading data, one
tensor at a time on demand, memory-mapped. Nothing here knows a model's math; GGUF's tensor names
and metadata keys come from each architecture's schema (localglm/models/<arch>/gguf.py).
"""
