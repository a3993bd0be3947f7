"""Data: tokenizers, corpora, megatron indexed datasets and resumable training iterators.

Importing this package imports none of its modules (nor megatron-core), so a
module here can depend on :mod:`distill_plugins.aligners` (text alignment) while
the aligners depend on :mod:`.tokenizer`. docs/data.md.

Modules:
    tokenizer          one tokenizer loader (``tokenizer.json``, HF directory, ``embedded:N``); BPE training
    embedded_corpus    the embedded stdlib-docstring corpus (three cached JSONL splits)
    embedded           the embedded corpus's indexed datasets (``build_embedded``)
    sources            text sources: jsonl / plain files, document iteration
    indexed            megatron indexed datasets: writing and reading
    stream             the consumed-samples iterator base (resumption, DP sharding), prefetching, rank0_first
    iterators          resumable training microbatches of one DP rank (``build_data``, ``build_eval_data``)
    text_batches       raw-text batches with both tokenizations for cross-tokenizer aligners
    alignment_collate  the exact token alignment of two tokenizations, collated per microbatch
    instruct           prompt/response and chat records (``data.kind: instruct``): response-only labels, padded batches
    chat_template      rendering conversations: a tokenizer's jinja2 chat template or the plain template
    instruct_aligned   instruct batches with both tokenizations for cross-tokenizer aligners
    embedded_instruct  the built-in stdlib instruction task (``data.paths: [embedded]``), split by package
    synthetic          layout-independent synthetic token batches for tests and smoke runs
    progress, cache    progress lines for long work; atomic cache files
"""
