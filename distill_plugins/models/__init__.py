"""Model I/O: building megatron-core GPTModels, and reading/writing weights in other formats.

Modules (the first four import neither torch nor megatron-core: ``distill plan`` and
``distill check`` use them):
    hf_config        the one parser of Hugging Face config.json files (what converts, and its shape)
    hf_mapping       megatron <-> Hugging Face tensor names and index ranges along TP partition dims
    checkpoint_meta  distill_model.json, the shape record beside megatron and run checkpoints
    resolve          a model spec's shape from its source (hf: / megatron: / checkpoint: / inline)
    model_info       what ``distill check`` reports about a model (family, shape, parameters, padded vocab)
    build            GPTModel from a ModelSpec; padded vocabulary; PP split; full weights <-> TP/PP shards
    hf_import        Hugging Face safetensors -> this rank's shards (slice reads)
    hf_export        GPTModel -> Hugging Face directory
    megatron_ckpt    megatron dist_checkpointing save/load, loadable under another TP/PP
    sources          weights from a spec's source into the student; frozen teacher / reference models
"""
