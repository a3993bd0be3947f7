"""Model I/O: building megatron-core GPTModels, and reading/writing weights in other formats.

Modules:
    build          GPTModel from a ModelSpec; padded vocabulary; PP split; full weights <-> TP/PP shards
    sources        where weights come from (``hf:``, ``megatron:``, ``checkpoint:``); frozen teachers
    hf_import      Hugging Face checkpoint -> this rank's shards (mapping, safetensors reading)
    hf_export      GPTModel -> Hugging Face directory
    megatron_ckpt  megatron dist_checkpointing save/load, loadable under another TP/PP
    model_info     what ``distill check`` reports about a model, from config files only
"""
